-- requeue_dead: dead jobs (all, or the ids given) back to waiting with fresh attempts.
-- ARGV[3] '1' for every dead job, else ARGV[4..] the ids
-- Returns how many were requeued.
local ids = chosen_dead_ids()
local count = 0
for _, id in ipairs(ids) do
  local key = JOB .. id
  if redis.call('HGET', key, 'state') == 'dead' then
    redis.call('ZREM', K_DEAD, id)
    redis.call('HSET', key, 'state', 'waiting', 'attempts', '0', 'run_at', NOW_TEXT)
    redis.call('HDEL', key, 'finished_at')
    redis.call('ZADD', K_WAITING, NOW_TEXT, id)
    schedule(id, key, NOW_TEXT)
    count = count + 1
  end
end
return count
