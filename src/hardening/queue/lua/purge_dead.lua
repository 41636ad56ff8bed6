-- purge_dead: delete dead jobs (all, or the ids given).
-- ARGV[3] '1' for every dead job, else ARGV[4..] the ids
-- Returns how many were deleted.
local ids = chosen_dead_ids()
local count = 0
for _, id in ipairs(ids) do
  local key = JOB .. id
  if redis.call('HGET', key, 'state') == 'dead' then
    redis.call('ZREM', K_DEAD, id)
    redis.call('DEL', key)
    count = count + 1
  end
end
forget_if_empty()
return count
