-- dead_letters: the most recently dead jobs.
-- ARGV[3] how many at most
-- Returns one HGETALL per job, most recent first.
local jobs = {}
for _, id in ipairs(redis.call('ZREVRANGE', K_DEAD, 0, tonumber(ARGV[3]) - 1)) do
  jobs[#jobs + 1] = redis.call('HGETALL', JOB .. id)
end
return jobs
