-- A token bucket per key, kept in the shared dictionary so that it survives a reload.
--
--   local bucket = require("moongate.token_bucket").new{ limit = 100, per = 60 }
--   local ok, x = bucket:take(user)   -- true, tokens left | false, seconds to wait | nil, err
--
-- A bucket holds up to `burst` tokens (default: limit) and refills at limit/per tokens a second.
-- take(key, n) removes n tokens (default 1) if there are that many and returns true and the
-- whole tokens left; otherwise it removes nothing and returns false and the seconds until n
-- tokens are there (a whole number, at least 1, ready for Retry-After). When the dictionary
-- cannot answer (full, or in Redis and Redis is unavailable) it returns nil and the
-- dictionary's message: the caller decides whether that fails open or closed.
--
-- Each key costs one dictionary entry: instead of a count and a time, it stores the time at
-- which the bucket will be full again ("full_at"). The tokens at time now are
-- burst - (full_at - now) * rate, clamped to [0, burst]; taking n tokens moves full_at n/rate
-- later. The entry expires when the bucket is full, since a missing key means a full bucket.
-- A take is one call of dict.take_bucket, atomic on either back end (in Redis, a script), so a
-- limit kept in Redis holds exactly across every node that shares it.
local mg = require "moongate"

local floor, ceil, max = math.floor, math.ceil, math.max

local Bucket = {}
Bucket.__index = Bucket

local M = {}

-- opts: limit (tokens per `per`), per (seconds, default 60), burst (default limit),
-- prefix (dictionary key prefix, default "tb:"), dict (default moongate.dict),
-- clock (seconds, default moongate.now).
function M.new(opts)
  local limit = opts.limit
  local per = opts.per or 60
  assert(type(limit) == "number" and limit > 0, "token_bucket: limit must be a positive number")
  assert(type(per) == "number" and per > 0, "token_bucket: per must be a positive number")
  local burst = opts.burst or limit
  assert(type(burst) == "number" and burst >= 1, "token_bucket: burst must be at least 1")
  return setmetatable({
    interval = per / limit, -- seconds per token
    burst = burst,
    prefix = opts.prefix or "tb:",
    dict = opts.dict or mg.dict,
    clock = opts.clock or mg.now,
  }, Bucket)
end

function Bucket:take(key, n)
  n = n or 1
  local now = self.clock()
  local k = self.prefix .. key
  local dict, interval, burst = self.dict, self.interval, self.burst
  -- Times are seconds since the epoch (about 1.7e9), where a double resolves only to a few
  -- 1e-7 s; the rounding of many takes adds up, so comparisons allow a hundredth of a token.
  local slack = interval * 0.01
  -- One atomic step on the dictionary: exact across nodes when it is in Redis.
  local ok, x = dict.take_bucket(k, n, interval, burst, now)
  if ok == nil then
    return nil, x
  end
  -- The bucket may hold at most burst tokens' worth of debt: burst * interval seconds.
  if not ok then
    return false, max(1, ceil(x - slack))
  end
  return true, floor((burst * interval - (x - now)) / interval + 0.01)
end

-- The whole tokens key has now, without taking any.
function Bucket:peek(key)
  local now = self.clock()
  local full_at = max(self.dict.get(self.prefix .. key) or now, now)
  return floor((self.burst * self.interval - (full_at - now)) / self.interval + 0.01)
end

function Bucket:reset(key)
  self.dict.delete(self.prefix .. key)
end

return M
