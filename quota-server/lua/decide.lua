-- Sluice: check-and-consume (or refund) many limits in one atomic call.
--
-- Mirrors sluice-core's algorithms with the same integer math, in "ticks"
-- of `res` microseconds (1 or 1000) instead of nanoseconds. Lua numbers
-- are doubles, so every quantity must stay below 2^52; the server refuses
-- limits that could exceed it (see storage/redis.rs), and `now` in
-- microseconds since the Unix epoch stays below 2^52 until the year 2112.
--
-- One call carries a batch of decisions (the requests that queued while
-- the previous call was in flight), each decided on its own and in order,
-- all at one Redis time: a decision is all-or-nothing over its own items
-- only, exactly as if it had been a call of its own.
--
-- KEYS: per item of every decision in order, the state hash then the log
-- list (same hash tag).
-- ARGV[1]: the number of decisions; then per decision:
--   "check" or "refund";
--   the time in microseconds, or "" to read Redis TIME (tests only pass
--   one, to replay sequences against the core);
--   the number of items; then 8 arguments per item: algorithm, res (us
--   per tick), count, per (ticks), burst, cost, enforce (1: takes part in
--   all-or-nothing; 0: shadow), and for a calendar window (fixed_window
--   only) "b0,b1,b2,b3" in ticks: the windows [b0, b1), [b1, b2),
--   [b2, b3) around the server's time (else empty).
-- Reply: per decision, an array: for "check", per item allowed (0/1),
-- remaining, reset_after (ticks), retry_after (ticks, -1 for never); for
-- "refund", empty. A decision that failed (a key of the wrong type, a bad
-- argument) answers a string, its error, instead: the others still count.

local NEVER = -1

-- floor(a / b) for integers 0 <= a, 1 <= b below 2^52, corrected for the
-- rounding of the double division.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceildiv(a, b)
  if a <= 0 then
    return 0
  end
  return idiv(a - 1, b) + 1
end

local function window_start(now, per)
  return now - (now - idiv(now, per) * per)
end

-- The fixed window [start, end) containing `now`: aligned to `per`, or
-- the calendar window among those the server sent (clamped to the first
-- or last when Redis's clock is a whole window away from the server's).
local function fixed_window(it, now)
  local b = it.calendar
  if b == nil then
    local start = window_start(now, it.per)
    return start, start + it.per
  end
  if now < b[2] then
    return b[1], b[2]
  elseif now < b[3] then
    return b[2], b[3]
  end
  return b[3], b[4]
end

local function num(v)
  return tonumber(v) or 0
end

-- An integer as exact decimal text: Lua's own number formatting keeps
-- only 14 significant digits, too few for microsecond timestamps.
local function int(x)
  return string.format('%.0f', x)
end

-- Each algorithm: load(item) fills item.st; acquire(item, now, consume)
-- returns allowed, remaining, reset, retry (and may normalise item.st);
-- refund(item, now); save(item, now) writes item.st back with a TTL.

-- States are written even when back to fresh, and live at least this long
-- (ms): core never lets a key's time go backwards (a state remembers the
-- latest time it saw), and keeping the state a second keeps that promise
-- across small clock steps between callers; it also spares re-creating
-- the key on every request at high rates.
local MIN_TTL_MS = 1000

-- A replayed time (tests) is not Redis's clock, which runs expiry: keys
-- then get no TTL rather than one measured against the wrong clock.
local function expire_at(it, key, now, fresh_at)
  if it.replay then
    return
  end
  -- PEXPIRE takes milliseconds; round up and add one so a key never
  -- expires while its state could still matter.
  local ms = math.floor(((fresh_at - now) * it.res + 999) / 1000) + 1
  redis.call('PEXPIRE', key, int(math.max(ms, MIN_TTL_MS)))
end

local meter = {}

function meter.load(it)
  local v = redis.call('HMGET', it.key, 'at', 'p', 'f')
  it.existed = v[1] ~= false
  it.st = {at = num(v[1]), p = num(v[2]), f = num(v[3])}
end

function meter.level(it, now)
  local st = it.st
  local capacity = it.burst * it.per
  local stored
  if st.p >= it.burst then
    stored = capacity
  else
    stored = math.min(st.p * it.per + st.f, capacity)
  end
  local elapsed = now - st.at
  if elapsed >= ceildiv(stored, it.count) then
    return 0
  end
  return math.min(stored - elapsed * it.count, capacity)
end

function meter.store(it, now, level)
  local whole = idiv(level, it.per)
  it.st = {at = now, p = whole, f = level - whole * it.per}
end

local function free_permits(burst, whole, frac)
  local extra = 0
  if frac ~= 0 then
    extra = 1
  end
  return math.max(0, burst - whole - extra)
end

function meter.acquire(it, now, consume)
  now = math.max(now, it.st.at)
  local level = meter.level(it, now)
  local capacity = it.burst * it.per
  local whole = idiv(level, it.per)
  local frac = level - whole * it.per
  if it.cost <= it.burst and level + it.cost * it.per <= capacity then
    local after = level + it.cost * it.per
    if consume then
      meter.store(it, now, after)
    else
      meter.store(it, now, level)
    end
    return 1, free_permits(it.burst, whole + it.cost, frac), ceildiv(after, it.count), 0
  end
  meter.store(it, now, level)
  local retry = NEVER
  if it.cost <= it.burst then
    retry = ceildiv(level - (capacity - it.cost * it.per), it.count)
  end
  return 0, free_permits(it.burst, whole, frac), ceildiv(level, it.count), retry
end

function meter.refund(it, now)
  now = math.max(now, it.st.at)
  local level = meter.level(it, now)
  meter.store(it, now, math.max(0, level - math.min(it.cost, it.burst) * it.per))
end

function meter.save(it, now)
  local level = it.st.p * it.per + it.st.f
  redis.call('HSET', it.key, 'at', int(it.st.at), 'p', int(it.st.p), 'f', int(it.st.f))
  expire_at(it, it.key, now, it.st.at + ceildiv(level, it.count))
end

local fixed = {}

function fixed.load(it)
  local v = redis.call('HMGET', it.key, 's', 'u')
  it.existed = v[1] ~= false
  it.st = {s = num(v[1]), u = num(v[2])}
end

function fixed.acquire(it, now, consume)
  local st = it.st
  local start, ending = fixed_window(it, now)
  if start > st.s then
    st.s = start
    st.u = 0
  end
  now = math.max(now, st.s)
  local allowed = it.cost <= math.max(0, it.count - st.u)
  local used_after = st.u
  if allowed then
    used_after = st.u + it.cost
  end
  if allowed and consume then
    st.u = used_after
  end
  if it.calendar == nil then
    ending = st.s + it.per
  end
  -- A state ahead of a calendar window (time went back): its end is not
  -- known, the window's bounds the report.
  local to_end = math.max(0, ending - now)
  local reset = to_end
  if used_after == 0 then
    reset = 0
  end
  if allowed then
    return 1, math.max(0, it.count - used_after), reset, 0
  end
  local retry = to_end
  if it.cost > it.count then
    retry = NEVER
  end
  return 0, math.max(0, it.count - used_after), reset, retry
end

function fixed.refund(it, now)
  local start = fixed_window(it, now)
  if start <= it.st.s then
    it.st.u = math.max(0, it.st.u - it.cost)
  end
end

function fixed.save(it, now)
  redis.call('HSET', it.key, 's', int(it.st.s), 'u', int(it.st.u))
  local _, ending = fixed_window(it, it.st.s)
  expire_at(it, it.key, now, ending)
end

local counter = {}

function counter.load(it)
  local v = redis.call('HMGET', it.key, 's', 'pv', 'cu')
  it.existed = v[1] ~= false
  it.st = {s = num(v[1]), pv = num(v[2]), cu = num(v[3])}
end

function counter.roll(it, now)
  local st = it.st
  local start = window_start(now, it.per)
  if start > st.s then
    if st.s + it.per == start then
      st.pv = st.cu
    else
      st.pv = 0
    end
    st.cu = 0
    st.s = start
  end
end

function counter.retry(it, elapsed, previous, current)
  local per, count, cost = it.per, it.count, it.cost
  local to_end = per - elapsed
  if previous > 0 then
    local slack = count - current - cost
    if slack >= 0 then
      local most_weight = idiv(slack * per, previous)
      if most_weight > 0 and most_weight < to_end then
        return to_end - most_weight
      end
    end
  end
  local into_next = 0
  if current ~= 0 then
    into_next = math.max(0, per - idiv((count - cost) * per, current))
  end
  return to_end + into_next
end

function counter.acquire(it, now, consume)
  counter.roll(it, now)
  local st = it.st
  now = math.max(now, st.s)
  local per, count = it.per, it.count
  local elapsed = now - st.s
  local weighted = st.pv * (per - elapsed)
  local allowed = it.cost <= math.max(0, count - st.cu)
    and weighted + (st.cu + it.cost) * per <= count * per
  local current_after = st.cu
  if allowed then
    current_after = st.cu + it.cost
  end
  if allowed and consume then
    st.cu = current_after
  end
  local share = ceildiv(weighted, per)
  local ending = st.s + per
  local reset = 0
  if current_after > 0 then
    reset = ending + per - now
  elseif st.pv > 0 then
    reset = ending - now
  end
  local remaining = math.max(0, math.max(0, count - current_after) - share)
  if allowed then
    return 1, remaining, reset, 0
  end
  local retry = NEVER
  if it.cost <= count then
    retry = counter.retry(it, elapsed, st.pv, st.cu)
  end
  return 0, remaining, reset, retry
end

function counter.refund(it, now)
  if window_start(now, it.per) <= it.st.s then
    it.st.cu = math.max(0, it.st.cu - it.cost)
  end
end

function counter.save(it, now)
  counter.roll(it, now)
  local st = it.st
  redis.call('HSET', it.key, 's', int(st.s), 'pv', int(st.pv), 'cu', int(st.cu))
  local fresh_at = st.s + it.per
  if st.cu > 0 then
    fresh_at = fresh_at + it.per
  end
  expire_at(it, it.key, now, fresh_at)
end

local gcra = {}

function gcra.load(it)
  local v = redis.call('HMGET', it.key, 't', 'f')
  it.existed = v[1] ~= false
  it.st = {t = num(v[1]), f = math.min(num(v[2]), it.count - 1)}
end

-- How far the TAT is ahead of `now`, in 1/count ticks. Beyond the
-- tolerance it reads as a debt, as in the core: a clock that went back is
-- stricter, never more generous.
function gcra.ahead(it, now)
  local d = it.st.t - now
  if d < 0 then
    return 0
  end
  return d * it.count + it.st.f
end

function gcra.acquire(it, now, consume)
  local tolerance = it.burst * it.per
  local ahead = gcra.ahead(it, now)
  local wanted = it.cost * it.per
  if it.cost > it.burst or ahead + wanted > tolerance then
    local retry = NEVER
    if it.cost <= it.burst then
      retry = ceildiv(ahead + wanted - tolerance, it.count)
    end
    return 0, idiv(math.max(0, tolerance - ahead), it.per), ceildiv(ahead, it.count), retry
  end
  local after = ahead + wanted
  if consume and it.cost > 0 then
    local whole = idiv(after, it.count)
    it.st = {t = now + whole, f = after - whole * it.count}
  end
  return 1, idiv(tolerance - after, it.per), ceildiv(after, it.count), 0
end

function gcra.refund(it, now)
  local d = it.st.t - now
  if d < 0 or (d == 0 and it.st.f == 0) then
    return
  end
  local tolerance = it.burst * it.per
  local ahead = d * it.count + it.st.f
  if d > ceildiv(tolerance, it.count) then
    -- Far ahead (the clock went back): step back whole ticks only as
    -- far as the refund reaches, keeping values small.
    local back = ceildiv(math.min(it.cost, it.burst) * it.per, it.count)
    it.st.t = math.max(now, it.st.t - back)
    return
  end
  ahead = math.max(0, ahead - math.min(it.cost, it.burst) * it.per)
  local whole = idiv(ahead, it.count)
  it.st = {t = now + whole, f = ahead - whole * it.count}
end

function gcra.save(it, now)
  local st = it.st
  redis.call('HSET', it.key, 't', int(st.t), 'f', int(st.f))
  expire_at(it, it.key, now, math.max(st.t, now) + 1)
end

local log = {}

function log.load(it)
  local v = redis.call('HMGET', it.key, 'last', 'total')
  it.existed = v[1] ~= false
  local raw = redis.call('LRANGE', it.log, 0, -1)
  local entries = {}
  for i = 1, #raw do
    local sep = string.find(raw[i], ':', 1, true)
    entries[i] = {num(string.sub(raw[i], 1, sep - 1)), num(string.sub(raw[i], sep + 1))}
  end
  it.st = {last = num(v[1]), total = num(v[2]), entries = entries, first = 1}
end

function log.expire(it, now)
  local st = it.st
  while st.first <= #st.entries and st.entries[st.first][1] + it.per <= now do
    st.total = math.max(0, st.total - st.entries[st.first][2])
    st.first = st.first + 1
  end
end

function log.acquire(it, now, consume)
  local st = it.st
  now = math.max(now, st.last)
  st.last = now
  log.expire(it, now)
  local used = st.total
  local count = it.count
  local newest = st.entries[#st.entries]
  if newest ~= nil and #st.entries < st.first then
    newest = nil
  end
  if it.cost <= math.max(0, count - used) then
    if consume and it.cost > 0 then
      st.total = st.total + it.cost
      if newest ~= nil and newest[1] == now then
        newest[2] = newest[2] + it.cost
        st.tail = 'set'
      else
        st.entries[#st.entries + 1] = {now, it.cost}
        st.tail = 'push'
      end
    end
    local reset = 0
    if it.cost > 0 then
      reset = it.per
    elseif newest ~= nil then
      reset = newest[1] + it.per - now
    end
    return 1, count - used - it.cost, reset, 0
  end
  local retry = NEVER
  if it.cost <= count then
    local excess = used + it.cost - count
    local freed = 0
    for i = st.first, #st.entries do
      freed = freed + st.entries[i][2]
      retry = st.entries[i][1] + it.per - now
      if freed >= excess then
        break
      end
    end
    if retry == NEVER then
      retry = 0
    end
  end
  local reset = 0
  if newest ~= nil then
    reset = newest[1] + it.per - now
  end
  return 0, math.max(0, count - used), reset, retry
end

function log.refund(it, now)
  -- The refunded permits are the most recent ones.
  local st = it.st
  local left = it.cost
  while left > 0 and #st.entries >= st.first do
    local e = st.entries[#st.entries]
    local taken = math.min(e[2], left)
    e[2] = e[2] - taken
    left = left - taken
    st.total = math.max(0, st.total - taken)
    if e[2] == 0 then
      st.entries[#st.entries] = nil
    end
  end
  st.rewrite = true
end

function log.save(it, now)
  local st = it.st
  log.expire(it, math.max(now, st.last))
  redis.call('HSET', it.key, 'last', int(st.last), 'total', int(st.total))
  if #st.entries < st.first then
    redis.call('DEL', it.log)
    expire_at(it, it.key, now, now)
    return
  end
  if st.rewrite then
    redis.call('DEL', it.log)
    for i = st.first, #st.entries do
      redis.call('RPUSH', it.log, int(st.entries[i][1]) .. ':' .. int(st.entries[i][2]))
    end
  else
    if st.first > 1 then
      redis.call('LTRIM', it.log, st.first - 1, -1)
    end
    local e = st.entries[#st.entries]
    if st.tail == 'push' then
      redis.call('RPUSH', it.log, int(e[1]) .. ':' .. int(e[2]))
    elseif st.tail == 'set' then
      redis.call('LSET', it.log, -1, int(e[1]) .. ':' .. int(e[2]))
    end
  end
  local fresh_at = st.entries[#st.entries][1] + it.per
  expire_at(it, it.key, now, fresh_at)
  expire_at(it, it.log, now, fresh_at)
end

local algorithms = {
  token_bucket = meter,
  leaky_bucket = meter,
  fixed_window = fixed,
  sliding_window_counter = counter,
  gcra = gcra,
  sliding_window_log = log,
}

-- Redis's time, read once per call (only if a decision needs it).
local redis_now_us
local function time_us(replayed)
  if replayed ~= '' then
    return tonumber(replayed)
  end
  if redis_now_us == nil then
    local t = redis.call('TIME')
    redis_now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return redis_now_us
end

-- Reads one decision's items from ARGV[base + 1...] and KEYS[key + 1...].
local function load_items(n, base, key, now_us, replay)
  local items = {}
  for i = 1, n do
    local at = base + (i - 1) * 8
    local alg = algorithms[ARGV[at + 1]]
    if alg == nil then
      error('sluice: unknown algorithm ' .. tostring(ARGV[at + 1]), 0)
    end
    local res = tonumber(ARGV[at + 2])
    local it = {
      alg = alg,
      key = KEYS[key + 2 * i - 1],
      log = KEYS[key + 2 * i],
      res = res,
      count = tonumber(ARGV[at + 3]),
      per = tonumber(ARGV[at + 4]),
      burst = tonumber(ARGV[at + 5]),
      cost = tonumber(ARGV[at + 6]),
      enforce = ARGV[at + 7] == '1',
      now = math.floor(now_us / res),
      replay = replay,
    }
    if ARGV[at + 8] ~= '' then
      local b = {}
      for t in string.gmatch(ARGV[at + 8], '%d+') do
        b[#b + 1] = tonumber(t)
      end
      if #b ~= 4 then
        error('sluice: a calendar window needs 4 boundaries', 0)
      end
      it.calendar = b
    end
    alg.load(it)
    items[i] = it
  end
  return items
end

local function refund(items)
  for i = 1, #items do
    local it = items[i]
    it.alg.refund(it, it.now)
    it.alg.save(it, it.now)
  end
  return {}
end

-- A lone item is its own all-or-nothing: decided and taken in one pass
-- (the peek below would only repeat it).
local function check_one(it)
  local allowed, remaining, reset, retry = it.alg.acquire(it, it.now, true)
  if (allowed == 1 and it.cost > 0) or it.existed then
    it.alg.save(it, it.now)
  end
  return {allowed, remaining, reset, retry}
end

local function check(items)
  local n = #items
  if n == 1 then
    return check_one(items[1])
  end
  -- Peek everything first: an enforced item over its limit means nothing
  -- is taken from any item (the core engine's all-or-nothing).
  local reply = {}
  local admitted = true
  local peeked = {}
  for i = 1, n do
    local it = items[i]
    local allowed, remaining, reset, retry = it.alg.acquire(it, it.now, false)
    peeked[i] = {allowed, remaining, reset, retry}
    if allowed == 0 and it.enforce then
      admitted = false
    end
  end
  for i = 1, n do
    local it = items[i]
    local out = peeked[i]
    local consumed = false
    if admitted and out[1] == 1 then
      local allowed, remaining, reset, retry = it.alg.acquire(it, it.now, true)
      out = {allowed, remaining, reset, retry}
      consumed = it.cost > 0
    elseif out[1] == 1 and it.cost > 0 then
      -- Refused as a whole: this item gave nothing, so it reports its
      -- permits as they stand (its peek counted the cost as taken).
      local cost = it.cost
      it.cost = 0
      local _, remaining, reset = it.alg.acquire(it, it.now, false)
      it.cost = cost
      out = {out[1], remaining, reset, out[4]}
    end
    -- A state brought up to date is written back even when nothing was
    -- taken (core's store does the same): it remembers the latest time
    -- seen. A key that was absent and took nothing stays absent.
    if consumed or it.existed then
      it.alg.save(it, it.now)
    end
    for k = 1, 4 do
      reply[#reply + 1] = out[k]
    end
  end
  return reply
end

local function decide(mode, replayed, n, base, key)
  local items = load_items(n, base, key, time_us(replayed), replayed ~= '')
  if mode == 'refund' then
    return refund(items)
  elseif mode == 'check' then
    return check(items)
  end
  error('sluice: unknown mode ' .. tostring(mode), 0)
end

-- A failed decision's error as text: redis.call raises a table.
local function message(err)
  if type(err) == 'table' then
    return tostring(err.err or err)
  end
  return tostring(err)
end

local replies = {}
local base, key = 1, 0
for d = 1, tonumber(ARGV[1]) do
  local mode, replayed, n = ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3])
  if n == nil then
    return redis.error_reply('sluice: decision ' .. d .. ' has no item count')
  end
  local ok, reply = pcall(decide, mode, replayed, n, base + 3, key)
  if ok then
    replies[d] = reply
  else
    replies[d] = message(reply)
  end
  base = base + 3 + 8 * n
  key = key + 2 * n
end
return replies
