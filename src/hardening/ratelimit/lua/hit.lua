-- hardening rate limiter: check (and charge) every limit of one key in one atomic step.
-- Mirrors hardening/ratelimit/policy.py (counter_hit, moving_window_hit); times in milliseconds
-- from the server's own clock, so application servers' clock skew cannot change a decision.
--
-- KEYS[1]            the key's block marker
-- KEYS[2 .. n+1]     one state key per limit (a hash for counters, a sorted set for the log)
-- ARGV[1]            strategy: 'swc' sliding-window counter, 'fw' fixed window, 'mw' moving window
-- ARGV[2]            cost (units)
-- ARGV[3]            block_for in ms (0: never block)
-- ARGV[4]            '1' to peek (charge nothing, never block)
-- ARGV[3 + 2i], ARGV[4 + 2i]   amount and window (ms) of limit i
--
-- Returns {allowed, blocked, now_ms, blocked_ms, then per limit: remaining, reset_ms, retry_ms}
-- where retry_ms is -1 for a limit that allows the hit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local strategy = ARGV[1]
local cost = tonumber(ARGV[2])
local block_ms = tonumber(ARGV[3])
local peek = ARGV[4] == '1'
local n = #KEYS - 1
local EPS = 1e-6
local out = {0, 0, math.floor(now), 0}

-- a limiter without block_for neither sets nor reads blocks: one command less per hit
local blocked = 0
if block_ms > 0 then blocked = redis.call('PTTL', KEYS[1]) end
if blocked > 0 then
  out[2] = 1
  out[4] = blocked
  for _ = 1, n do
    table.insert(out, 0)
    table.insert(out, blocked)
    table.insert(out, blocked)
  end
  return out
end

local allowed = true
local states = {}
for i = 1, n do
  local key = KEYS[i + 1]
  local amount = tonumber(ARGV[3 + 2 * i])
  local window = tonumber(ARGV[4 + 2 * i])
  local ok, remaining, reset, retry
  if strategy == 'mw' then
    -- scores are formatted by hand: Lua's default number format keeps only 14 digits
    redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now - window))
    local count = redis.call('ZCARD', key)
    local oldest = now
    if count > 0 then
      oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
    end
    reset = math.ceil(oldest + window - now)
    if count + cost <= amount then
      ok, remaining, retry = true, amount - count - cost, -1
    else
      ok, remaining = false, math.max(0, amount - count)
      if cost > amount then
        retry = window
      else
        local k = count + cost - amount - 1
        retry = math.ceil(tonumber(redis.call('ZRANGE', key, k, k, 'WITHSCORES')[2]) + window - now)
      end
    end
    states[i] = {key, count, window}
  else
    local h = redis.call('HMGET', key, 'i', 'c', 'p')
    local index = math.floor(now / window)
    local stored = tonumber(h[1])
    local current, previous = 0, 0
    if stored == index then
      current, previous = tonumber(h[2]) or 0, tonumber(h[3]) or 0
    elseif stored == index - 1 then
      previous = tonumber(h[2]) or 0
    end
    local elapsed = now - index * window
    local weight = 0
    if strategy == 'swc' then weight = 1 - elapsed / window end
    local used = previous * weight + current
    reset = math.ceil(window - elapsed)
    if used + cost <= amount + EPS then
      ok, remaining, retry = true, math.floor(amount - used - cost + EPS), -1
    else
      ok, remaining = false, math.max(0, math.floor(amount - used + EPS))
      local wait
      if cost > amount then
        wait = window
      elseif strategy == 'swc' and previous > 0 and current + cost <= amount then
        wait = window * (1 - (amount - current - cost) / previous) - elapsed
      elseif strategy == 'swc' and current > 0 then
        wait = (window - elapsed) + window * (1 - (amount - cost) / current)
      else
        wait = window - elapsed
      end
      retry = math.max(1, math.ceil(wait))
    end
    states[i] = {key, index, current, previous, window, stored == index}
  end
  if not ok then allowed = false end
  table.insert(out, remaining)
  table.insert(out, reset)
  table.insert(out, retry)
end

if not allowed or peek then
  -- nothing is charged: limits that would allow show what is left now
  for i = 1, n do
    if out[4 + 3 * i] == -1 then out[2 + 3 * i] = out[2 + 3 * i] + cost end
  end
end
if allowed then
  out[1] = 1
  if not peek then
    for i = 1, n do
      local s = states[i]
      if strategy == 'mw' then
        local score = string.format('%.3f', now)
        local members = {}
        for u = 1, cost do
          table.insert(members, score)
          table.insert(members, score .. ':' .. (s[2] + u))
          if #members >= 1000 or u == cost then  -- stay far below Lua's unpack limit
            redis.call('ZADD', s[1], unpack(members))
            members = {}
          end
        end
        redis.call('PEXPIRE', s[1], math.ceil(s[3]))
      else
        if s[6] then
          redis.call('HSET', s[1], 'c', s[3] + cost)
        else  -- a new window: its TTL (two windows) outlives the next window, set it once
          redis.call('HSET', s[1], 'i', s[2], 'c', s[3] + cost, 'p', s[4])
          redis.call('PEXPIRE', s[1], math.ceil(2 * s[5]))
        end
      end
    end
  end
elseif block_ms > 0 and not peek then
  redis.call('SET', KEYS[1], '1', 'PX', block_ms)
  out[2] = 1
  out[4] = block_ms
end
return out
