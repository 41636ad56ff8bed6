-- ack_many: mark claimed jobs completed, each one if its lease is still held.
-- ARGV[3..] pairs of id and lease token (the caller sends at most 500 pairs per call).
-- Returns one number per pair: 1 acked, 0 lease lost. The caller knows the rest of each job
-- (its claimed form, closed at ARGV[2]), so no hash travels back.
local acked = {}
for i = 3, #ARGV - 1, 2 do
  local id = ARGV[i]
  local key = JOB .. id
  if held(key, ARGV[i + 1]) then
    finish_attempt(key, 'completed', nil)
    redis.call('HSET', key, 'state', 'completed', 'finished_at', NOW_TEXT)
    redis.call('ZADD', K_COMPLETED, NOW_TEXT, id)
    acked[#acked + 1] = 1
  else
    acked[#acked + 1] = 0
  end
end
return acked
