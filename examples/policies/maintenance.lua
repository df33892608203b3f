-- Maintenance: a shutdown with its own grace period and message, and no new work while
-- draining.
--
-- When the gateway is told to stop (SIGTERM), the shutdown hook gives in-flight requests two
-- minutes and a message for clients, and raises a flag in the shared dictionary; from then on
-- admit refuses new requests with 503 and Retry-After. The flag is also raised by starting with
-- MOONGATE_MAINTENANCE=1 (or reloading with it set), and the pool's own draining state counts
-- too. Because the dictionary survives reloads, so does the flag.
local mg = require "moongate"
local default = require "moongate.default"

local FLAG = "maintenance:draining"
local retry_after = "300"

if mg.env("MOONGATE_MAINTENANCE") == "1" then
  mg.dict.set(FLAG, "configured")
end

local function draining()
  if mg.dict.get(FLAG) then
    return true
  end
  local pool = mg.pool_stats()
  return pool ~= nil and pool.draining
end

return {
  authenticate = default.authenticate,

  admit = function(req, user, stats)
    if draining() then
      return false, 503, "moongate is down for maintenance; please retry later",
             { ["retry-after"] = retry_after }
    end
    return true
  end,

  shutdown = function(info)
    mg.dict.set(FLAG, info.reason)
    mg.warn("maintenance shutdown:", info.reason, "with", info.in_flight, "requests in flight")
    return {
      grace_ms = 120000,
      notify_clients = true,
      force_after_grace = true,
      message = "moongate is going down for maintenance; retry in a few minutes",
    }
  end,
}
