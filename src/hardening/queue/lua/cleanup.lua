-- cleanup: delete up to `batch` completed and dead jobs that finished before the cutoff.
-- ARGV[3] the cutoff (exclusive), ARGV[4] batch size
-- Returns how many were deleted (fewer than `batch`: nothing older is left).
local cutoff, batch = '(' .. ARGV[3], tonumber(ARGV[4])
local count = 0
for _, index in ipairs({K_COMPLETED, K_DEAD}) do
  if count < batch then
    local ids = redis.call('ZRANGEBYSCORE', index, '-inf', cutoff, 'LIMIT', 0, batch - count)
    for _, id in ipairs(ids) do
      redis.call('DEL', JOB .. id)
      redis.call('ZREM', index, id)
    end
    count = count + #ids
  end
end
forget_if_empty()
return count
