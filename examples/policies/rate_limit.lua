-- 100 requests per minute per user. Past that, 429 with Retry-After (whole seconds).
--
-- Authentication is the default one (bearer tokens from MOONGATE_TOKENS). The buckets live in
-- the shared dictionary, so a reload does not hand everyone a fresh minute.
local mg = require "moongate"
local default = require "moongate.default"
local token_bucket = require "moongate.token_bucket"

local per_minute = 100
local bucket = token_bucket.new{ limit = per_minute, per = 60, prefix = "rl:" }

return {
  authenticate = default.authenticate,

  admit = function(req, user, stats)
    local ok, retry_after = bucket:take(user)
    if ok == nil then
      -- The dictionary is full: refuse rather than serve without a limit.
      mg.warn("rate limiter unavailable:", retry_after)
      return false, 503, "rate limiter unavailable", { ["retry-after"] = "5" }
    end
    if not ok then
      return false, 429, "rate limit: " .. per_minute .. " requests per minute",
             { ["retry-after"] = tostring(retry_after) }
    end
    return true
  end,
}
