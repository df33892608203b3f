-- Lua-side tests of lua/moongate/token_bucket.lua.
local T = require "harness"
local mg = require "moongate"
local token_bucket = require "moongate.token_bucket"

T.test("a full bucket allows a burst, then refuses with Retry-After", function()
  local clock, advance = T.clock()
  local b = token_bucket.new{ limit = 100, per = 60, prefix = "t1:", clock = clock }
  for i = 1, 100 do
    local ok, remaining = b:take("alice")
    T.eq(ok, true, "take " .. i)
    T.eq(remaining, 100 - i, "remaining after " .. i)
  end
  local ok, retry = b:take("alice")
  T.eq(ok, false, "take 101")
  T.eq(retry, 1, "retry-after (0.6 s rounds up to 1)")
  -- Other keys have buckets of their own.
  T.eq((b:take("bob")), true, "bob")
  -- One token comes back every 0.6 s.
  advance(0.6)
  T.eq((b:take("alice")), true, "after refill")
  T.eq((b:take("alice")), false, "only one came back")
end)

T.test("retry-after counts the seconds until enough tokens", function()
  local clock, advance = T.clock()
  local b = token_bucket.new{ limit = 60, per = 60, burst = 5, prefix = "t2:", clock = clock }
  for i = 1, 5 do T.eq((b:take("k")), true, "take " .. i) end
  local ok, retry = b:take("k", 3)
  T.eq(ok, false, "three more")
  T.eq(retry, 3, "three seconds for three tokens")
  advance(2.5)
  ok, retry = b:take("k", 3)
  T.eq(ok, false, "not yet")
  T.eq(retry, 1, "half a second rounds up")
  advance(0.5)
  T.eq((b:take("k", 3)), true, "now")
  T.eq(b:peek("k"), 0, "empty again")
end)

T.test("a bucket never holds more than its burst", function()
  local clock, advance = T.clock()
  local b = token_bucket.new{ limit = 10, per = 1, burst = 3, prefix = "t3:", clock = clock }
  advance(1000)
  T.eq(b:peek("k"), 3, "peek")
  for i = 1, 3 do T.eq((b:take("k")), true, "take " .. i) end
  T.eq((b:take("k")), false, "burst spent")
end)

T.test("asking for more than the burst can never succeed but says when it would", function()
  local clock = T.clock()
  local b = token_bucket.new{ limit = 1, per = 1, burst = 2, prefix = "t4:", clock = clock }
  local ok, retry = b:take("k", 3)
  T.eq(ok, false, "3 > burst")
  T.eq(retry, 1, "retry")
end)

T.test("the state lives in the dictionary with a TTL until full", function()
  local clock, advance = T.clock(5000)
  local b = token_bucket.new{ limit = 10, per = 10, prefix = "t5:", clock = clock }
  b:take("k", 4)
  -- full again 4 s later; mg.dict's own clock is the real one, so only check the value.
  T.near(mg.dict.get("t5:k"), 5004, 1e-9, "full_at")
  local ttl = mg.dict.ttl("t5:k")
  T.eq(ttl, 4000, "ttl in ms")
  b:reset("k")
  T.eq(mg.dict.get("t5:k"), nil, "reset")
  T.eq(b:peek("k"), 10, "full after reset")
end)

T.test("a full dictionary is reported, not ignored", function()
  local full = { get = function() return nil end,
                  take_bucket = function() return nil, "dictionary full" end }
  local b = token_bucket.new{ limit = 1, dict = full, clock = function() return 0 end }
  local ok, err = b:take("k")
  T.eq(ok, nil, "nil")
  T.eq(err, "dictionary full", "message")
end)

T.test("seconds since the epoch do not eat tokens through rounding", function()
  local clock, advance = T.clock(1700000000.123)
  for _, limit in ipairs{ 60, 100, 300, 1000, 7 } do
    local b = token_bucket.new{ limit = limit, per = 60, prefix = "t6:" .. limit .. ":", clock = clock }
    for i = 1, limit do T.eq((b:take("k")), true, limit .. "/min, take " .. i) end
    T.eq((b:take("k")), false, limit .. "/min, one more")
    advance(60)
    for i = 1, limit do T.eq((b:take("k")), true, limit .. "/min after a minute, take " .. i) end
  end
end)

T.test("bad options are refused", function()
  T.eq(pcall(token_bucket.new, { limit = 0 }), false, "limit 0")
  T.eq(pcall(token_bucket.new, { limit = 1, per = -1 }), false, "per < 0")
  T.eq(pcall(token_bucket.new, { limit = 1, burst = 0.5 }), false, "burst < 1")
end)

return T.run()
