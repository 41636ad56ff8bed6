-- claim: recover lapsed leases, move due delayed jobs to ready, then lease up to `limit`
-- ready jobs (highest priority, then oldest run_at, then enqueue order).
-- ARGV[3] lease expiry for the new claims, ARGV[4] limit, ARGV[5] the worker as JSON text,
-- ARGV[6] the LeaseExpired error as JSON text, ARGV[7] a random token prefix (unique per call),
-- ARGV[8] '0' to skip step 1 (the caller just ran recover.lua with its own lost budget)
-- Returns one HGETALL per claimed job.
local expires, limit, worker = ARGV[3], math.min(tonumber(ARGV[4]), 500), ARGV[5]
local lapsed_error, token_prefix = ARGV[6], ARGV[7]

-- Each step takes at most STEP jobs: one call's work is bounded however many leases lapsed
-- or delayed jobs fell due at once (the next claims take the rest).
local STEP = 500

-- 1. leases that lapsed: their worker died or stalled; the lost attempt counts
if ARGV[8] ~= '0' then recover_lapsed(STEP, lapsed_error) end

-- 2. delayed jobs now due
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', NOW_TEXT, 'LIMIT', 0, STEP)) do
  local h = redis.call('HMGET', JOB .. id, 'priority', 'run_at', 'seq')
  if h[1] then ready_add(id, h[1], h[2], h[3]) end
  redis.call('ZREM', K_DELAYED, id)
end

-- 3. lease the best ready jobs
local claimed = {}
if limit < 1 then return claimed end
local popped = redis.call('ZPOPMIN', K_READY, limit)
for i = 1, #popped, 2 do
  local id = string.sub(popped[i], MEMBER_HEAD + 1)
  local key = JOB .. id
  local h = redis.call('HMGET', key, 'state', 'attempts', 'dedupe_key')
  if h[1] == 'waiting' or h[1] == 'retrying' then
    redis.call('ZREM', INDEX[h[1]], id)
    if h[3] and redis.call('HGET', K_DEDUPE, h[3]) == id then
      redis.call('HDEL', K_DEDUPE, h[3])
    end
    redis.call('HSET', key, 'state', 'running', 'attempts', tostring(tonumber(h[2]) + 1),
      'lease_token', token_prefix .. string.format('%04x', #claimed), 'lease_expires_at', expires,
      'attempt_started_at', NOW_TEXT, 'attempt_worker', worker)
    redis.call('ZADD', K_RUNNING, expires, id)
    claimed[#claimed + 1] = redis.call('HGETALL', key)
  end
end
return claimed
