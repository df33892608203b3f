-- llama.cpp's server on the user's machine (llama-server --port 8080 --api-key KEY).
--
-- llama-server started with --api-key refuses a request without "Authorization: Bearer KEY"
-- (401). The key belongs to the user's machine, not to the web app: the policy keeps it
-- (LLAMACPP_API_KEY here; per user from a file in a real deployment) and the route sets it on
-- every request, in place of the gateway's own token, which never travels upstream.
-- Its OpenAI-compatible API lives under /v1, so errors take OpenAI's shape there.
-- A server started with --slots or a large context can take a while to answer: 5 minutes.
local mg = require "moongate"
local default = require "moongate.default"

local key = mg.env("LLAMACPP_API_KEY")
local headers = { origin = false }
if key and key ~= "" then
  headers.authorization = "Bearer " .. key
end

local route = default.route_with{
  target_host = "127.0.0.1",
  target_port = 8080,
  headers = headers,
  head_timeout_ms = 300000,
  idle_timeout_ms = 60000,
}

return {
  authenticate = default.authenticate,
  route = function(req, user)
    return route
  end,
}
