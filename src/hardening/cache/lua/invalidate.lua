-- hardening cache: delete every value in tag (or prefix) indexes, a bounded batch per call.
--
-- KEYS       the index names (declared for Cluster routing)
-- ARGV[1]    base ('<prefix>:c:{<namespace>}:')
-- ARGV[2]    the index kind: 't' tags, 'p' prefixes
-- ARGV[3]    the most members taken from each index in this call
-- ARGV[4..]  the index ids
--
-- Each call is atomic and touches only the members it takes (no KEYS, no SCAN). Returns
-- {deleted, left}: how many values existed and were deleted, and how many members are still
-- indexed (the caller calls again while left > 0).
local base, kind, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local deleted, left = 0, 0
for n = 4, #ARGV do
  local index = base .. kind .. ':' .. ARGV[n]
  local ids = redis.call('ZRANGE', index, 0, limit - 1)
  for _, id in ipairs(ids) do
    local tags_name = base .. 'g:' .. id
    local tags = redis.call('GET', tags_name)
    if tags then
      for tag in string.gmatch(tags, '[^\n]+') do redis.call('ZREM', base .. 't:' .. tag, id) end
      redis.call('DEL', tags_name)
    end
    deleted = deleted + redis.call('DEL', base .. 'k:' .. id)
  end
  if #ids > 0 then redis.call('ZREM', index, unpack(ids)) end
  left = left + redis.call('ZCARD', index)
end
return {deleted, left}
