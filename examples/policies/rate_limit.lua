-- 100 requests per minute per user. Past that, 429 with Retry-After (whole seconds).
--
-- Authentication is the default one (bearer tokens from MOONGATE_TOKENS). The buckets live in
-- the shared dictionary, so a reload does not hand everyone a fresh minute; with
-- MOONGATE_REDIS_URL that dictionary is Redis, and the limit holds across every node.
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
      -- The dictionary is full, or in Redis and Redis is unreachable (the gateway logs Redis's
      -- comings and goings): refuse rather than serve without a limit, and say so at most
      -- every 10 s on this node, not once per request.
      if not mg.node_dict.get("rl:warned") then
        mg.node_dict.set("rl:warned", 1, 10000)
        mg.warn("rate limiter unavailable (refusing with 503 meanwhile):", retry_after)
      end
      return false, 503, "rate limiter unavailable", { ["retry-after"] = "5" }
    end
    if not ok then
      return false, 429, "rate limit: " .. per_minute .. " requests per minute",
             { ["retry-after"] = tostring(retry_after) }
    end
    return true
  end,
}
