-- A daily token quota per user, and a cap on each user's requests at once.
--
--   MOONGATE_DAILY_TOKENS   tokens (prompt + completion) a user may use per UTC day; 100000
--   MOONGATE_MAX_CONCURRENT requests a user may have in flight at once; 4
--
-- The gateway reads what each response reports of its cost (docs/llm.md) and tells on_event
-- when the request ends; the count lives in the shared dictionary (mg.dict), so it survives
-- reloads, under a key per user and day that expires by itself. Once a user's count reaches the
-- quota, admit answers 429 with Retry-After set to the seconds until midnight UTC. Requests
-- already running when the quota is reached finish (and count): the quota can be passed by what
-- those use, never by new ones.
--
-- Authentication is the default one (bearer tokens from MOONGATE_TOKENS).
local mg = require "moongate"
local default = require "moongate.default"

local function num(var, default_value)
  local v = mg.env(var)
  if v == nil or v == "" then
    return default_value
  end
  local n = tonumber(v)
  if not n or n < 1 or n % 1 ~= 0 then
    error(var .. ": must be a whole number of at least 1, got '" .. v .. "'", 0)
  end
  return n
end

local daily = num("MOONGATE_DAILY_TOKENS", 100000)
local max_concurrent = num("MOONGATE_MAX_CONCURRENT", 4)
local DAY = 86400

local function today_key(user)
  return "tokens:" .. user .. ":" .. math.floor(mg.now() / DAY)
end

return {
  authenticate = default.authenticate,

  admit = function(req, user, stats)
    if stats.in_flight >= max_concurrent then
      return false, 429, string.format("at most %d requests at once", max_concurrent),
             { ["retry-after"] = "1" }
    end
    local used = mg.dict.get(today_key(user)) or 0
    if used >= daily then
      local retry = DAY - math.floor(mg.now()) % DAY
      return false, 429, string.format("daily token quota of %d used up", daily),
             { ["retry-after"] = tostring(retry) }
    end
    return true
  end,

  on_event = function(ev)
    if ev.type ~= "request" or not ev.user then
      return
    end
    local n = (ev.prompt_tokens or 0) + (ev.completion_tokens or 0)
    if n > 0 then
      local _, err = mg.dict.incr(today_key(ev.user), n, 2 * DAY * 1000)
      if err then
        mg.warn("token quota: cannot count", n, "tokens of", ev.user, ":", err)
      end
    end
  end,
}
