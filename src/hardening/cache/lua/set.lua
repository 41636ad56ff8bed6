-- hardening cache: store values with their tags and prefixes, atomically.
--
-- Every name shares the namespace's hash tag (base = '<prefix>:c:{<namespace>}:'), so on Redis
-- Cluster the names built here live in the slot of the declared KEYS.
--
-- KEYS               the value names being set (declared for Cluster routing)
-- ARGV[1]            base
-- ARGV[2], ARGV[3]   a stampede lock to release after the write: key id and token ('' none)
-- then per value:    id, envelope, ttl_ms, ntags, tag ids..., nprefixes, prefix ids...
--
-- A tag or prefix index is a sorted set of key ids scored by their expiry (ms, Redis clock):
-- members whose value expired are dropped on every write, and the index lives as long as its
-- longest-lived member. A key's own tags are kept in 'g:<id>' so a re-set without a tag, a
-- delete or an invalidation takes the key out of every other tag's index: tag invalidation
-- deletes exactly the keys that carry the tag now.
local base = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function index(name, id, expires, ttl)
  redis.call('ZADD', name, expires, id)
  redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
  if redis.call('PTTL', name) < ttl then redis.call('PEXPIRE', name, ttl) end
end

local i = 4
while i <= #ARGV do
  local id, ttl, ntags = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local expires = now + ttl
  redis.call('SET', base .. 'k:' .. id, ARGV[i + 1], 'PX', ttl)
  i = i + 4
  local tags_name = base .. 'g:' .. id
  local old = redis.call('GET', tags_name)
  if old then
    local keep = {}
    for j = i, i + ntags - 1 do keep[ARGV[j]] = true end
    for tag in string.gmatch(old, '[^\n]+') do
      if not keep[tag] then redis.call('ZREM', base .. 't:' .. tag, id) end
    end
  end
  if ntags > 0 then
    redis.call('SET', tags_name, table.concat(ARGV, '\n', i, i + ntags - 1), 'PX', ttl)
    for j = i, i + ntags - 1 do index(base .. 't:' .. ARGV[j], id, expires, ttl) end
  elseif old then
    redis.call('DEL', tags_name)
  end
  i = i + ntags
  local nprefixes = tonumber(ARGV[i])
  for j = i + 1, i + nprefixes do index(base .. 'p:' .. ARGV[j], id, expires, ttl) end
  i = i + nprefixes + 1
end

if ARGV[2] ~= '' then
  local lock = base .. 'l:' .. ARGV[2]
  if redis.call('GET', lock) == ARGV[3] then redis.call('DEL', lock) end
end
return 1
