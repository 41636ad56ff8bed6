-- hardening job queue (Redis): helpers every queue script starts with (the backend prepends
-- this file to each script). Mirrors hardening/queue/backends/memory.py.
--
-- Every script gets the same keys, all of one queue, all with one hash tag (one Cluster slot):
-- KEYS[1] ready      ZSET  score -priority, member <run_at as 16 hex digits><seq, 16 digits><id>
--                          (equal scores sort by member: priority, then run_at, then enqueue order)
-- KEYS[2] delayed    ZSET  waiting or retrying jobs not yet due, by run_at
-- KEYS[3] running    ZSET  claimed jobs, by lease expiry
-- KEYS[4] waiting    ZSET  jobs in state 'waiting' (due or not), by run_at: for stats
-- KEYS[5] retrying   ZSET  jobs in state 'retrying' (due or not), by run_at: for stats
-- KEYS[6] completed  ZSET  by finished_at
-- KEYS[7] dead       ZSET  by finished_at
-- KEYS[8] dedupe     HASH  dedupe_key -> id of the waiting job holding it
-- KEYS[9] seq        STRING the enqueue sequence (dropped when the queue holds no job)
-- ARGV[1]            the job hash key prefix ('<prefix>:{<queue>}:job:')
-- ARGV[2]            now (epoch seconds, from the application's clock)
--
-- Times travel as the application's strings and are stored as such: Lua's default number
-- format keeps only 14 significant digits, so a number is never turned back into text here
-- except through an explicit format.
local K_READY, K_DELAYED, K_RUNNING = KEYS[1], KEYS[2], KEYS[3]
local K_WAITING, K_RETRYING, K_COMPLETED, K_DEAD = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local K_DEDUPE, K_SEQ = KEYS[8], KEYS[9]
local JOB = ARGV[1]
local NOW_TEXT = ARGV[2]
local NOW = tonumber(NOW_TEXT)
local MEMBER_HEAD = 32  -- run_at hex (16) and seq (16) before the id in a ready member

-- big-endian IEEE 754 bits sort like the numbers they encode, for numbers >= 0
local function sortable(x)
  if not (x > 0) then x = 0 end
  local bits = struct.pack('>d', x)
  return (bits:gsub('.', function(c) return string.format('%02x', string.byte(c)) end))
end

local function ready_add(id, priority, run_at, seq)
  redis.call('ZADD', K_READY, string.format('%.17g', -tonumber(priority)),
    sortable(tonumber(run_at)) .. seq .. id)
end

-- put a waiting or retrying job where claim finds it: ready now, or delayed until run_at
local function schedule(id, key, run_at)
  local seq = string.format('%016.0f', redis.call('INCR', K_SEQ))
  redis.call('HSET', key, 'seq', seq)
  if tonumber(run_at) > NOW then
    redis.call('ZADD', K_DELAYED, run_at, id)
  else
    ready_add(id, redis.call('HGET', key, 'priority'), run_at, seq)
  end
end

-- the state index a job is counted in (and a finished job's place), by state
local INDEX = {
  waiting = K_WAITING, retrying = K_RETRYING, running = K_RUNNING,
  completed = K_COMPLETED, dead = K_DEAD,
}

-- close the running attempt: one JSON object appended to the finished history text
local function finish_attempt(key, outcome, error_json)
  local h = redis.call('HMGET', key, 'history', 'attempts', 'attempt_started_at', 'attempt_worker')
  local entry = '{"number":' .. h[2] .. ',"started_at":' .. h[3] .. ',"finished_at":' ..
    NOW_TEXT .. ',"outcome":"' .. outcome .. '","worker":' .. h[4] .. ',"error":' ..
    (error_json or 'null') .. '}'
  local history = h[1]
  if history == '[]' then
    history = '[' .. entry .. ']'
  else
    history = string.sub(history, 1, -2) .. ',' .. entry .. ']'
  end
  redis.call('HSET', key, 'history', history)
  redis.call('HDEL', key, 'lease_token', 'lease_expires_at', 'attempt_started_at', 'attempt_worker')
  redis.call('ZREM', K_RUNNING, string.sub(key, #JOB + 1))
end

-- the holder's lease: running, same token, not yet lapsed
local function held(key, token)
  local h = redis.call('HMGET', key, 'state', 'lease_token', 'lease_expires_at')
  return h[1] == 'running' and h[2] == token and (tonumber(h[3]) or 0) > NOW
end

local function dead_letter(id, key, error_json)
  redis.call('HSET', key, 'state', 'dead', 'finished_at', NOW_TEXT)
  if error_json then redis.call('HSET', key, 'last_error', error_json) end
  redis.call('ZADD', K_DEAD, NOW_TEXT, id)
end

local function retry(id, key, run_at, error_json)
  redis.call('HSET', key, 'state', 'retrying', 'run_at', run_at, 'last_error', error_json)
  redis.call('ZADD', K_RETRYING, run_at, id)
  schedule(id, key, run_at)
end

-- the sequence counter is the only key a queue has without a job: drop it with the last job
local function forget_if_empty()
  for _, index in pairs(INDEX) do
    if redis.call('ZCARD', index) > 0 then return end
  end
  redis.call('DEL', K_SEQ, K_READY, K_DELAYED, K_DEDUPE)
end

-- the dead jobs an operator named: every one when ARGV[3] is '1', else the ids in ARGV[4..]
local function chosen_dead_ids()
  -- 'all' is taken 500 at a time (the caller calls again while a call takes that many)
  if ARGV[3] == '1' then return redis.call('ZRANGE', K_DEAD, 0, 499) end
  local ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
  return ids
end

-- attempts already lost with a worker, counted in the stored history JSON
local function lost_before(key)
  local count = 0
  for _ in string.gmatch(redis.call('HGET', key, 'history') or '', '"outcome":"lost"') do
    count = count + 1
  end
  return count
end

-- leases that lapsed (their worker died or stalled), at most `limit` of them: the lost
-- attempt counts; each job is retried, or dead-lettered when its budget is spent: with
-- `max_lost`, once it lost that many attempts (its failures count apart); without, once its
-- attempts reach max_attempts. Returns the ids recovered.
local function recover_lapsed(limit, lapsed_error, max_lost)
  local ids = redis.call('ZRANGEBYSCORE', K_RUNNING, '-inf', NOW_TEXT, 'LIMIT', 0, limit)
  local recovered = {}
  for _, id in ipairs(ids) do
    local key = JOB .. id
    local h = redis.call('HMGET', key, 'attempts', 'max_attempts', 'state')
    if h[3] ~= 'running' then  -- never left behind by these scripts; dropped if found
      redis.call('ZREM', K_RUNNING, id)
    else
      local spent
      if max_lost then
        spent = lost_before(key) + 1 >= max_lost
      else
        spent = tonumber(h[1]) >= tonumber(h[2])
      end
      finish_attempt(key, 'lost', lapsed_error)
      if spent then
        dead_letter(id, key, lapsed_error)
      else
        retry(id, key, NOW_TEXT, lapsed_error)
      end
      recovered[#recovered + 1] = id
    end
  end
  return recovered
end
