-- vLLM's OpenAI-compatible server on the user's machine (vllm serve MODEL --api-key KEY, port
-- 8000).
--
-- vLLM started with --api-key (or VLLM_API_KEY) wants "Authorization: Bearer KEY" on /v1. Each
-- user's machine has its own key: VLLM_KEYS maps users to them ("alice:KEY1,bob:KEY2"), and the
-- route sets the user's key in place of the gateway's token. A user without a key is refused
-- here, rather than sent upstream to be refused there.
-- Usage comes back in every non-streamed response, and in streams when the client asks for
-- stream_options.include_usage: the gateway counts it either way (docs/llm.md).
local mg = require "moongate"
local default = require "moongate.default"

local keys = {}
for entry in (mg.env("VLLM_KEYS") or ""):gmatch("[^,]+") do
  local user, key = entry:match("^%s*([^:%s]+):(%S+)%s*$")
  if not user then
    error("VLLM_KEYS: each entry must be user:key, got '" .. entry .. "'", 0)
  end
  keys[user] = key
end

local routes = {}
for user, key in pairs(keys) do
  routes[user] = default.route_with{
    target_host = "127.0.0.1",
    target_port = 8000,
    headers = { authorization = "Bearer " .. key, origin = false },
    head_timeout_ms = 600000, -- the first request after start compiles CUDA graphs
    idle_timeout_ms = 60000,
    error_format = "openai",
  }
end

return {
  authenticate = default.authenticate,
  route = function(req, user)
    local r = routes[user]
    if not r then
      return nil, 503, "no vLLM key for this user"
    end
    return r
  end,
}
