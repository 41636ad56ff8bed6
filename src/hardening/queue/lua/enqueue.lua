-- enqueue: store a new waiting job, or return the waiting job holding the same dedupe key.
-- ARGV[3] id, ARGV[4] queue, ARGV[5] payload JSON, ARGV[6] priority, ARGV[7] run_at,
-- ARGV[8] created_at, ARGV[9] max_attempts, ARGV[10] '1' with a dedupe key, ARGV[11] the key,
-- ARGV[12] the attempt timeout in seconds ('' for the processor's)
-- Returns {1} when stored, or {0, <the existing job's HGETALL>} when deduplicated.
-- Idempotent: a job id that exists already is left alone and {1} returned. The client resends
-- a command whose reply was lost (one retry after a connection error), and by then a worker
-- may have claimed, or even finished, the job the first run stored.
local id = ARGV[3]
local deduped = ARGV[10] == '1'
local dedupe_key = ARGV[11]
local key = JOB .. id
if redis.call('EXISTS', key) == 1 then return {1} end
if deduped then
  local existing = redis.call('HGET', K_DEDUPE, dedupe_key)
  if existing then
    local state = redis.call('HGET', JOB .. existing, 'state')
    if state == 'waiting' or state == 'retrying' then
      return {0, redis.call('HGETALL', JOB .. existing)}
    end
  end
end
local run_at = ARGV[7]
redis.call('HSET', key, 'id', id, 'queue', ARGV[4], 'payload', ARGV[5], 'priority', ARGV[6],
  'attempts', '0', 'max_attempts', ARGV[9], 'state', 'waiting', 'created_at', ARGV[8],
  'run_at', run_at, 'history', '[]')
if ARGV[12] and ARGV[12] ~= '' then redis.call('HSET', key, 'timeout', ARGV[12]) end
if deduped then
  redis.call('HSET', key, 'dedupe_key', dedupe_key)
  redis.call('HSET', K_DEDUPE, dedupe_key, id)
end
redis.call('ZADD', K_WAITING, run_at, id)
schedule(id, key, run_at)
return {1}
