-- hardening cache: delete values and take them out of their tags' indexes, atomically.
--
-- KEYS       the value names (declared for Cluster routing)
-- ARGV[1]    base ('<prefix>:c:{<namespace>}:')
-- ARGV[2..]  the key ids
--
-- Returns how many values existed. Prefix indexes are left alone: a stale member there is
-- still a key with that prefix, and it is dropped when its expiry passes.
local base = ARGV[1]
local deleted = 0
for n = 2, #ARGV do
  local id = ARGV[n]
  local tags_name = base .. 'g:' .. id
  local tags = redis.call('GET', tags_name)
  if tags then
    for tag in string.gmatch(tags, '[^\n]+') do redis.call('ZREM', base .. 't:' .. tag, id) end
    redis.call('DEL', tags_name)
  end
  deleted = deleted + redis.call('DEL', base .. 'k:' .. id)
end
return deleted
