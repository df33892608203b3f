-- Tiers: each user's plan sets their request rate and their concurrent SSH connections.
--
--   tier         requests/min   connections
--   free                   60             1
--   premium               300             3
--   enterprise           1000            10
--
-- MOONGATE_TIERS assigns plans ("alice:premium,carol:enterprise"); anyone else is free.
-- Authentication is the default one (bearer tokens from MOONGATE_TOKENS).
local mg = require "moongate"
local default = require "moongate.default"
local token_bucket = require "moongate.token_bucket"

local tiers = {
  free = { per_minute = 60, connections = 1 },
  premium = { per_minute = 300, connections = 3 },
  enterprise = { per_minute = 1000, connections = 10 },
}
for name, tier in pairs(tiers) do
  tier.name = name
  tier.bucket = token_bucket.new{ limit = tier.per_minute, per = 60, prefix = "tier:" .. name .. ":" }
end

local plan = {}
for entry in (mg.env("MOONGATE_TIERS") or ""):gmatch("[^,]+") do
  local user, name = entry:match("^%s*([^:%s]+):(%a+)%s*$")
  if not user or not tiers[name] then
    error("MOONGATE_TIERS: bad entry '" .. entry .. "' (user:free|premium|enterprise)", 0)
  end
  plan[user] = tiers[name]
end

local function tier_of(user)
  return plan[user] or tiers.free
end

return {
  authenticate = default.authenticate,

  admit = function(req, user, stats)
    local tier = tier_of(user)
    local ok, retry_after = tier.bucket:take(user)
    if ok == nil then
      return false, 503, "rate limiter unavailable", { ["retry-after"] = "5" }
    end
    if not ok then
      return false, 429, string.format("%s plan: %d requests per minute", tier.name,
                                       tier.per_minute), { ["retry-after"] = tostring(retry_after) }
    end
    return true
  end,

  limits = function(user)
    return { max_connections = tier_of(user).connections }
  end,
}
