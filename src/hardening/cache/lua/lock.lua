-- hardening cache: take a key's stampede lock, unless its value is already there.
--
-- Checking and locking in one step closes the race where a value is stored (and its lock
-- released) between a caller's read and its lock: that caller would load a second time.
--
-- KEYS[1]    the value
-- KEYS[2]    the lock
-- ARGV[1]    the caller's token
-- ARGV[2]    the lock's TTL in ms
-- ARGV[3]    '0' to lock without looking at the value (the caller cannot read what is there)
--
-- Returns {1, value} when the value is there, {2} when the lock was taken, {0} when another
-- caller holds it.
if ARGV[3] ~= '0' then
  local value = redis.call('GET', KEYS[1])
  if value then return {1, value} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
