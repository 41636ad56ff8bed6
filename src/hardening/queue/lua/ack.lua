-- ack: mark a claimed job completed, if its lease is still held.
-- ARGV[3] id, ARGV[4] lease token
-- Returns {0} when the lease is lost, else {1, <the job's HGETALL>}.
local id = ARGV[3]
local key = JOB .. id
if not held(key, ARGV[4]) then return {0} end
finish_attempt(key, 'completed', nil)
redis.call('HSET', key, 'state', 'completed', 'finished_at', NOW_TEXT)
redis.call('ZADD', K_COMPLETED, NOW_TEXT, id)
return {1, redis.call('HGETALL', key)}
