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
-- Decisions on the same key read it once and write it once per call (see
-- `keep`).
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

-- Cost matters here: Redis runs this whole chunk again on every call, and
-- making a closure or a table costs about a microsecond. So an algorithm's
-- functions are made only when a call uses it (see `algorithm`), and an
-- item's state lives in fields of the item itself rather than in tables
-- made afresh on every update.

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
-- only 14 significant digits, too few for microsecond timestamps. '%d'
-- converts to a C long (64 bits where Redis runs), exact for the
-- integers below 2^52 kept here, and is cheaper than '%.0f'.
local function int(x)
  return string.format('%d', x)
end

-- Each algorithm (made by `<name>_algorithm()`) has load(it) (fills the
-- item's state fields from Redis, and `read_fresh_at` from them: see
-- `expire_at`),
-- acquire(it, now, consume) returning allowed, remaining, reset, retry
-- (and normalising the state), refund(it, now), and save(it, now) (writes
-- the state back, with a TTL when it must move).

-- States are written even when back to fresh, and live this long (ms)
-- past the time they are fresh again: core never lets a key's time go
-- backwards (a state remembers the latest time it saw), and keeping the
-- state a second keeps that promise across small clock steps; it also
-- spares re-creating the key on every request at high rates.
local MIN_TTL_MS = 1000

-- Sets the key's expiry to MIN_TTL_MS past `fresh_at` (ticks), the time
-- the state being written is fresh again. Every writer, this version or
-- an older one (whose expiry was the later of `fresh_at` and a second from
-- its write), leaves a key living at least until its state's `fresh_at`:
-- so `it.read_fresh_at`, the `fresh_at` of the state as read (nil where
-- it is not known), bounds the key's expiry from below, and a write whose
-- state is fresh no later (a fixed window's count rising within its
-- window, a refused GCRA request) skips the PEXPIRE, about a tenth of a
-- fixed window's time in the script.
-- The state layout is unchanged: servers of either version share keys.
-- A replayed time (tests) is not Redis's clock, which runs expiry: keys
-- then get no TTL rather than one measured against the wrong clock.
local function expire_at(it, key, now, fresh_at)
  local read = it.read_fresh_at
  if it.replay or (read ~= nil and fresh_at <= read and now <= read) then
    return
  end
  -- PEXPIRE takes milliseconds; round up and add one so a key never
  -- expires while its state could still matter.
  local ms = math.floor((math.max(0, fresh_at - now) * it.res + 999) / 1000) + 1
  redis.call('PEXPIRE', key, int(ms + MIN_TTL_MS))
end

-- Token and leaky bucket: the level `p` whole permits and `f` ticks×count
-- at time `at`.
local function meter_algorithm()
  -- When the level has drained (or refilled) to fresh.
  local function meter_fresh(it)
    return it.at + ceildiv(it.p * it.per + it.f, it.count)
  end

  local function meter_load(it)
    local v = redis.call('HMGET', it.key, 'at', 'p', 'f')
    it.existed = v[1] ~= false
    it.at, it.p, it.f = num(v[1]), num(v[2]), num(v[3])
    if it.existed then
      it.read_fresh_at = meter_fresh(it)
    end
  end

  local function meter_level(it, now)
    local capacity = it.burst * it.per
    local stored
    if it.p >= it.burst then
      stored = capacity
    else
      stored = math.min(it.p * it.per + it.f, capacity)
    end
    local elapsed = now - it.at
    if elapsed >= ceildiv(stored, it.count) then
      return 0
    end
    return math.min(stored - elapsed * it.count, capacity)
  end

  local function meter_store(it, now, level)
    local whole = idiv(level, it.per)
    it.at, it.p, it.f = now, whole, level - whole * it.per
  end

  local function free_permits(burst, whole, frac)
    local extra = 0
    if frac ~= 0 then
      extra = 1
    end
    return math.max(0, burst - whole - extra)
  end

  local function meter_acquire(it, now, consume)
    now = math.max(now, it.at)
    local level = meter_level(it, now)
    local capacity = it.burst * it.per
    local whole = idiv(level, it.per)
    local frac = level - whole * it.per
    if it.cost <= it.burst and level + it.cost * it.per <= capacity then
      local after = level + it.cost * it.per
      if consume then
        meter_store(it, now, after)
      else
        meter_store(it, now, level)
      end
      return 1, free_permits(it.burst, whole + it.cost, frac), ceildiv(after, it.count), 0
    end
    meter_store(it, now, level)
    local retry = NEVER
    if it.cost <= it.burst then
      retry = ceildiv(level - (capacity - it.cost * it.per), it.count)
    end
    return 0, free_permits(it.burst, whole, frac), ceildiv(level, it.count), retry
  end

  local function meter_refund(it, now)
    now = math.max(now, it.at)
    local level = meter_level(it, now)
    meter_store(it, now, math.max(0, level - math.min(it.cost, it.burst) * it.per))
  end

  local function meter_save(it, now)
    redis.call('HSET', it.key, 'at', int(it.at), 'p', int(it.p), 'f', int(it.f))
    expire_at(it, it.key, now, meter_fresh(it))
  end
  local function meter_adopt(it, from)
    it.at, it.p, it.f = from.at, from.p, from.f
  end

  return {
    load = meter_load,
    adopt = meter_adopt,
    acquire = meter_acquire,
    refund = meter_refund,
    save = meter_save,
  }
end

-- Fixed window: `u` permits used in the window starting at `s`.
local function fixed_algorithm()
  -- The end of the state's window.
  local function fixed_fresh(it)
    local _, ending = fixed_window(it, it.s)
    return ending
  end

  local function fixed_load(it)
    local v = redis.call('HMGET', it.key, 's', 'u')
    it.existed = v[1] ~= false
    it.s, it.u = num(v[1]), num(v[2])
    -- A calendar state's end is known only when its window is one the
    -- server sent: an older one's would be clamped to a later window's,
    -- overstating the key's expiry.
    local b = it.calendar
    if it.existed and (b == nil or it.s == b[1] or it.s == b[2] or it.s == b[3]) then
      it.read_fresh_at = fixed_fresh(it)
    end
  end

  local function fixed_acquire(it, now, consume)
    local start, ending = fixed_window(it, now)
    if start > it.s then
      it.s = start
      it.u = 0
    end
    now = math.max(now, it.s)
    local allowed = it.cost <= math.max(0, it.count - it.u)
    local used_after = it.u
    if allowed then
      used_after = it.u + it.cost
    end
    if allowed and consume then
      it.u = used_after
    end
    if it.calendar == nil then
      ending = it.s + it.per
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

  local function fixed_refund(it, now)
    local start = fixed_window(it, now)
    if start <= it.s then
      it.u = math.max(0, it.u - it.cost)
    end
  end

  local function fixed_save(it, now)
    redis.call('HSET', it.key, 's', int(it.s), 'u', int(it.u))
    expire_at(it, it.key, now, fixed_fresh(it))
  end
  local function fixed_adopt(it, from)
    it.s, it.u = from.s, from.u
  end

  return {
    load = fixed_load,
    adopt = fixed_adopt,
    acquire = fixed_acquire,
    refund = fixed_refund,
    save = fixed_save,
  }
end

-- Sliding window counter: `pv` permits in the window before the one
-- starting at `s`, `cu` in that one.
local function counter_algorithm()
  -- The end of the window after the state's, or of its own when nothing
  -- is counted in it.
  local function counter_fresh(it)
    if it.cu > 0 then
      return it.s + 2 * it.per
    end
    return it.s + it.per
  end

  local function counter_load(it)
    local v = redis.call('HMGET', it.key, 's', 'pv', 'cu')
    it.existed = v[1] ~= false
    it.s, it.pv, it.cu = num(v[1]), num(v[2]), num(v[3])
    if it.existed then
      it.read_fresh_at = counter_fresh(it)
    end
  end

  local function counter_roll(it, now)
    local start = window_start(now, it.per)
    if start > it.s then
      if it.s + it.per == start then
        it.pv = it.cu
      else
        it.pv = 0
      end
      it.cu = 0
      it.s = start
    end
  end

  local function counter_retry(it, elapsed, previous, current)
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

  local function counter_acquire(it, now, consume)
    counter_roll(it, now)
    now = math.max(now, it.s)
    local per, count = it.per, it.count
    local elapsed = now - it.s
    local weighted = it.pv * (per - elapsed)
    local allowed = it.cost <= math.max(0, count - it.cu)
      and weighted + (it.cu + it.cost) * per <= count * per
    local current_after = it.cu
    if allowed then
      current_after = it.cu + it.cost
    end
    if allowed and consume then
      it.cu = current_after
    end
    local share = ceildiv(weighted, per)
    local ending = it.s + per
    local reset = 0
    if current_after > 0 then
      reset = ending + per - now
    elseif it.pv > 0 then
      reset = ending - now
    end
    local remaining = math.max(0, math.max(0, count - current_after) - share)
    if allowed then
      return 1, remaining, reset, 0
    end
    local retry = NEVER
    if it.cost <= count then
      retry = counter_retry(it, elapsed, it.pv, it.cu)
    end
    return 0, remaining, reset, retry
  end

  local function counter_refund(it, now)
    if window_start(now, it.per) <= it.s then
      it.cu = math.max(0, it.cu - it.cost)
    end
  end

  local function counter_save(it, now)
    counter_roll(it, now)
    redis.call('HSET', it.key, 's', int(it.s), 'pv', int(it.pv), 'cu', int(it.cu))
    expire_at(it, it.key, now, counter_fresh(it))
  end
  local function counter_adopt(it, from)
    it.s, it.pv, it.cu = from.s, from.pv, from.cu
  end

  return {
    load = counter_load,
    adopt = counter_adopt,
    acquire = counter_acquire,
    refund = counter_refund,
    settle = counter_roll,
    save = counter_save,
  }
end

-- GCRA: the theoretical arrival time `t` ticks and `f` 1/count ticks.
local function gcra_algorithm()
  local function gcra_load(it)
    local v = redis.call('HMGET', it.key, 't', 'f')
    it.existed = v[1] ~= false
    it.t, it.f = num(v[1]), math.min(num(v[2]), it.count - 1)
    if it.existed then
      it.read_fresh_at = it.t + 1
    end
  end

  -- How far the TAT is ahead of `now`, in 1/count ticks. Beyond the
  -- tolerance it reads as a debt, as in the core: a clock that went back is
  -- stricter, never more generous.
  local function gcra_ahead(it, now)
    local d = it.t - now
    if d < 0 then
      return 0
    end
    return d * it.count + it.f
  end

  local function gcra_acquire(it, now, consume)
    local tolerance = it.burst * it.per
    local ahead = gcra_ahead(it, now)
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
      it.t, it.f = now + whole, after - whole * it.count
    end
    return 1, idiv(tolerance - after, it.per), ceildiv(after, it.count), 0
  end

  local function gcra_refund(it, now)
    local d = it.t - now
    if d < 0 or (d == 0 and it.f == 0) then
      return
    end
    local tolerance = it.burst * it.per
    local ahead = d * it.count + it.f
    if d > ceildiv(tolerance, it.count) then
      -- Far ahead (the clock went back): step back whole ticks only as
      -- far as the refund reaches, keeping values small.
      local back = ceildiv(math.min(it.cost, it.burst) * it.per, it.count)
      it.t = math.max(now, it.t - back)
      return
    end
    ahead = math.max(0, ahead - math.min(it.cost, it.burst) * it.per)
    local whole = idiv(ahead, it.count)
    it.t, it.f = now + whole, ahead - whole * it.count
  end

  local function gcra_save(it, now)
    redis.call('HSET', it.key, 't', int(it.t), 'f', int(it.f))
    expire_at(it, it.key, now, it.t + 1)
  end
  local function gcra_adopt(it, from)
    it.t, it.f = from.t, math.min(from.f, it.count - 1)
  end

  return {
    load = gcra_load,
    adopt = gcra_adopt,
    acquire = gcra_acquire,
    refund = gcra_refund,
    save = gcra_save,
  }
end

-- Sliding window log: `total` permits in the `entries` {time, permits}
-- from index `first` on (the list), `last` the latest time seen; `tail`
-- and `rewrite` say how the list changed.
local function log_algorithm()
  local function log_load(it)
    local v = redis.call('HMGET', it.key, 'last', 'total')
    it.existed = v[1] ~= false
    local raw = redis.call('LRANGE', it.log, 0, -1)
    local entries = {}
    for i = 1, #raw do
      local sep = string.find(raw[i], ':', 1, true)
      entries[i] = {num(string.sub(raw[i], 1, sep - 1)), num(string.sub(raw[i], sep + 1))}
    end
    it.last, it.total, it.entries, it.first = num(v[1]), num(v[2]), entries, 1
  end

  local function log_expire(it, now)
    local entries = it.entries
    while it.first <= #entries and entries[it.first][1] + it.per <= now do
      it.total = math.max(0, it.total - entries[it.first][2])
      it.first = it.first + 1
    end
  end

  local function log_acquire(it, now, consume)
    local entries = it.entries
    now = math.max(now, it.last)
    it.last = now
    log_expire(it, now)
    local used = it.total
    local count = it.count
    local newest = entries[#entries]
    if newest ~= nil and #entries < it.first then
      newest = nil
    end
    if it.cost <= math.max(0, count - used) then
      if consume and it.cost > 0 then
        it.total = it.total + it.cost
        if newest ~= nil and newest[1] == now then
          newest[2] = newest[2] + it.cost
          it.tail = 'set'
        else
          entries[#entries + 1] = {now, it.cost}
          it.tail = 'push'
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
      for i = it.first, #entries do
        freed = freed + entries[i][2]
        retry = entries[i][1] + it.per - now
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

  local function log_refund(it, now)
    -- The refunded permits are the most recent ones.
    local entries = it.entries
    local left = it.cost
    while left > 0 and #entries >= it.first do
      local e = entries[#entries]
      local taken = math.min(e[2], left)
      e[2] = e[2] - taken
      left = left - taken
      it.total = math.max(0, it.total - taken)
      if e[2] == 0 then
        entries[#entries] = nil
      end
    end
    it.rewrite = true
  end

  local function log_entry(e)
    return int(e[1]) .. ':' .. int(e[2])
  end

  local function log_save(it, now)
    local entries = it.entries
    log_expire(it, math.max(now, it.last))
    redis.call('HSET', it.key, 'last', int(it.last), 'total', int(it.total))
    if #entries < it.first then
      redis.call('DEL', it.log)
      expire_at(it, it.key, now, now)
      return
    end
    if it.rewrite then
      redis.call('DEL', it.log)
      for i = it.first, #entries do
        redis.call('RPUSH', it.log, log_entry(entries[i]))
      end
    else
      if it.first > 1 then
        redis.call('LTRIM', it.log, it.first - 1, -1)
      end
      if it.tail == 'push' then
        redis.call('RPUSH', it.log, log_entry(entries[#entries]))
      elseif it.tail == 'set' then
        redis.call('LSET', it.log, -1, log_entry(entries[#entries]))
      end
    end
    local fresh_at = entries[#entries][1] + it.per
    expire_at(it, it.key, now, fresh_at)
    expire_at(it, it.log, now, fresh_at)
  end
  -- No adopt: a log's list is written as it changes, not once at the end.
  return {load = log_load, acquire = log_acquire, refund = log_refund, save = log_save}
end

-- The algorithms this call uses, each made on first use.
local algorithms = {}
local function algorithm(name)
  local alg = algorithms[name]
  if alg ~= nil then
    return alg
  end
  if name == 'fixed_window' then
    alg = fixed_algorithm()
  elseif name == 'token_bucket' or name == 'leaky_bucket' then
    alg = meter_algorithm()
  elseif name == 'gcra' then
    alg = gcra_algorithm()
  elseif name == 'sliding_window_counter' then
    alg = counter_algorithm()
  elseif name == 'sliding_window_log' then
    alg = log_algorithm()
  else
    return nil
  end
  algorithms[name] = alg
  return alg
end

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

-- States kept by decisions, written once at the end of the call: a later
-- decision on the same key takes the state from here (`adopt`: a copy of
-- what it would have read back), so a hot key costs one read and one
-- write per call, not per decision. `pending` maps a key to its latest
-- kept item; `pending_order` lists the keys as first kept. A call of one
-- decision (the raw one-call-per-decision form) has nothing to share and
-- writes as it goes, without these tables.
local pending, pending_order
if tonumber(ARGV[1]) ~= 1 then
  pending, pending_order = {}, {}
end

-- Writes a key's pending state now.
local function flush(key)
  local it = pending and pending[key]
  if it ~= nil then
    pending[key] = nil
    it.alg.save(it, it.now)
  end
end

local function flush_all()
  if pending == nil then
    return
  end
  for i = 1, #pending_order do
    flush(pending_order[i])
  end
end

-- Keeps an item's state as its decision leaves it: written at the end of
-- the call, or at once by an algorithm without `adopt` (the log).
local function keep(it)
  local alg = it.alg
  if pending == nil or alg.adopt == nil then
    alg.save(it, it.now)
    return
  end
  -- What `save` normalises before writing, so that an adopting decision
  -- sees what it would have read back.
  if alg.settle ~= nil then
    alg.settle(it, it.now)
  end
  if pending[it.key] == nil then
    pending_order[#pending_order + 1] = it.key
  end
  pending[it.key] = it
end

-- Reads one decision's items from ARGV[base + 1...] and KEYS[key + 1...].
local function load_items(n, base, key, now_us, replay)
  local items = {}
  for i = 1, n do
    local at = base + (i - 1) * 8
    local alg = algorithm(ARGV[at + 1])
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
    local kept = pending and pending[it.key]
    if kept ~= nil and kept.alg == alg and alg.adopt ~= nil then
      -- Redis still holds the state `kept` read, and its expiry.
      it.existed, it.read_fresh_at = true, kept.read_fresh_at
      alg.adopt(it, kept)
    else
      flush(it.key)
      alg.load(it)
    end
    items[i] = it
  end
  return items
end

local function refund(items)
  for i = 1, #items do
    local it = items[i]
    it.alg.refund(it, it.now)
    keep(it)
  end
  return {}
end

-- A lone item is its own all-or-nothing: decided and taken in one pass
-- (the peek below would only repeat it).
local function check_one(it)
  local allowed, remaining, reset, retry = it.alg.acquire(it, it.now, true)
  if (allowed == 1 and it.cost > 0) or it.existed then
    keep(it)
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
      keep(it)
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
    flush_all()
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
flush_all()
return replies
