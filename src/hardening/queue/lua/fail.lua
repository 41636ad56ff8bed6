-- fail: record a failed attempt, if the lease is still held; retry at run_at or dead-letter.
-- ARGV[3] id, ARGV[4] lease token, ARGV[5] the error as JSON text, ARGV[6] retry_at ('' = dead)
-- Returns {0} when the lease is lost, else {1, <the job's HGETALL>}.
local id = ARGV[3]
local key = JOB .. id
if not held(key, ARGV[4]) then return {0} end
finish_attempt(key, 'failed', ARGV[5])
if ARGV[6] == '' then
  dead_letter(id, key, ARGV[5])
else
  retry(id, key, ARGV[6], ARGV[5])
end
return {1, redis.call('HGETALL', key)}
