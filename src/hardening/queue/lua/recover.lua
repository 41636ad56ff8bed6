-- recover: retry or dead-letter up to `limit` jobs whose lease lapsed (claim does the same
-- first; a worker calls this before claiming so that it can report what it found).
-- ARGV[3] limit (at most 500), ARGV[4] the LeaseExpired error as JSON text,
-- ARGV[5] max_lost ('' to dead-letter by max_attempts instead)
-- Returns one HGETALL per recovered job, as it is now (retrying or dead).
local limit = math.min(tonumber(ARGV[3]), 500)
local jobs = {}
for _, id in ipairs(recover_lapsed(limit, ARGV[4], tonumber(ARGV[5]))) do
  jobs[#jobs + 1] = redis.call('HGETALL', JOB .. id)
end
return jobs
