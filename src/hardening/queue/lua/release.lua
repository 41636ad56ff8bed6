-- release: give a claimed job back unfinished (shutdown); its attempt is not counted.
-- ARGV[3] id, ARGV[4] lease token. A lapsed lease not yet recovered can still be released.
-- Returns 1 when released, 0 when the job was not held with this token.
local id = ARGV[3]
local key = JOB .. id
local h = redis.call('HMGET', key, 'state', 'lease_token', 'attempts')
if h[1] ~= 'running' or h[2] ~= ARGV[4] then return 0 end
finish_attempt(key, 'released', nil)
local attempts = tonumber(h[3])
local state = 'retrying'
if attempts <= 1 then state = 'waiting' end
redis.call('HSET', key, 'state', state, 'attempts', tostring(attempts - 1), 'run_at', NOW_TEXT)
redis.call('ZADD', INDEX[state], NOW_TEXT, id)
schedule(id, key, NOW_TEXT)
return 1
