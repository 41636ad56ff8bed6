-- heartbeat: extend the leases still held (running, same token, not lapsed).
-- ARGV[3] the new lease expiry, then pairs ARGV[4 + 2i], ARGV[5 + 2i]: a job id and its token
-- Returns the ids whose lease is held.
local expires = ARGV[3]
local held_ids = {}
for i = 4, #ARGV - 1, 2 do
  local id, key = ARGV[i], JOB .. ARGV[i]
  if held(key, ARGV[i + 1]) then
    redis.call('HSET', key, 'lease_expires_at', expires)
    redis.call('ZADD', K_RUNNING, expires, id)
    held_ids[#held_ids + 1] = id
  end
end
return held_ids
