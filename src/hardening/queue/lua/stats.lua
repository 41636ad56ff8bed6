-- stats: counts per state and the run_at of the oldest ready job ('' when none is ready).
-- Returns {waiting, delayed, running, retrying, dead, completed, oldest run_at}.
local oldest = ''
for _, index in ipairs({K_WAITING, K_RETRYING}) do
  local first = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= NOW and (oldest == '' or
      tonumber(first[2]) < tonumber(oldest)) then
    oldest = first[2]
  end
end
local due = redis.call('ZCOUNT', K_WAITING, '-inf', NOW_TEXT)
return {
  due,
  redis.call('ZCARD', K_WAITING) - due,
  redis.call('ZCARD', K_RUNNING),
  redis.call('ZCARD', K_RETRYING),
  redis.call('ZCARD', K_DEAD),
  redis.call('ZCARD', K_COMPLETED),
  oldest,
}
