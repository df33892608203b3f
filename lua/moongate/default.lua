-- The default policy: what moongate runs when no policy file is given, and where every hook a
-- policy file leaves out comes from. docs/policy.md describes each hook.
--
-- It admits nobody by accident. Requests must carry "Authorization: Bearer TOKEN" with a token
-- listed in MOONGATE_TOKENS ("alice:TOKEN1,bob:TOKEN2"); without that variable every request is
-- refused with a 401 that says how to fix it. Agents authenticate the same way against
-- MOONGATE_AGENT_TOKENS. Limits and shutdown return nil: the gateway's settings (environment)
-- apply. Routes go over TCP to the sshd and the LLM server of the MOONGATE_* variables below.
local mg = require "moongate"

local M = {}

-- Reads "user:token,user:token" into a table keyed by the token's SHA-256, so that a lookup
-- compares digests rather than the secrets themselves.
local function parse_tokens(var)
  local spec = mg.env(var)
  local map, count = {}, 0
  if spec == nil or spec == "" then
    return map, 0
  end
  for entry in spec:gmatch("[^,]+") do
    local user, token = entry:match("^%s*([^:%s]+):(%S+)%s*$")
    if not user then
      error(var .. ": each entry must be user:token, got '" .. entry .. "'", 0)
    end
    map[mg.sha256(token)] = user
    count = count + 1
  end
  return map, count
end

local tokens, ntokens = parse_tokens("MOONGATE_TOKENS")
local agent_tokens = parse_tokens("MOONGATE_AGENT_TOKENS")

local challenge = { ["www-authenticate"] = 'Bearer realm="moongate"' }

-- The bearer token of a request, or nil.
local function bearer(req)
  local h = req.headers.authorization
  return h and h:match("^[Bb]earer%s+(%S+)%s*$")
end

function M.authenticate(req)
  if ntokens == 0 then
    return nil, 401, "moongate has no users: set MOONGATE_TOKENS or give a policy file", challenge
  end
  local token = bearer(req)
  if not token then
    return nil, 401, "missing bearer token", challenge
  end
  local user = tokens[mg.sha256(token)]
  if not user then
    return nil, 401, "invalid token", challenge
  end
  return user
end

function M.admit(req, user, stats)
  return true
end

function M.limits(user)
  return nil
end

local function num(var, default)
  local v = mg.env(var)
  return v and tonumber(v) or default
end

local route = {
  transport = "tcp",
  host = mg.env("MOONGATE_SSH_HOST") or "127.0.0.1",
  port = num("MOONGATE_SSH_PORT", 22),
  ssh_user = mg.env("MOONGATE_SSH_USER") or "llm",
  key = mg.env("MOONGATE_SSH_KEY") or "/etc/moongate/id_ed25519",
  known_hosts = mg.env("MOONGATE_KNOWN_HOSTS") or "/etc/moongate/known_hosts",
  target_host = mg.env("MOONGATE_TARGET_HOST") or "127.0.0.1",
  target_port = num("MOONGATE_TARGET_PORT", 11434),
}

function M.route(req, user)
  return route
end

-- The default route with fields added or replaced: for a policy that keeps the MOONGATE_SSH_*
-- connection and says what its LLM server needs (examples/policies/ollama.lua). A helper, not a
-- hook: it is reached through the module's metatable, so the table of hooks holds hooks alone.
local function route_with(fields)
  local r = {}
  for k, v in pairs(route) do
    r[k] = v
  end
  for k, v in pairs(fields) do
    r[k] = v
  end
  return r
end

function M.agent_auth(token, req)
  local user = token and agent_tokens[mg.sha256(token)]
  if not user then
    return nil, 401, "unknown agent token"
  end
  return user
end

function M.on_event(ev)
  mg.debug("event", ev.type, ev.user or "", ev.message or "")
end

function M.shutdown(info)
  return nil
end

return setmetatable(M, { __index = { route_with = route_with } })
