-- A small test harness for Lua-side tests. Each tests/lua/test_*.lua file is loaded as a policy
-- by tests/unit/test_policy_lua.c; it runs its cases while loading and raises an error (which
-- fails the load, and so the C test) naming every case that failed.
local M = {}

local cases = {}

function M.test(name, fn)
  cases[#cases + 1] = { name = name, fn = fn }
end

function M.eq(got, want, what)
  if got ~= want then
    error(string.format("%s: got %s, want %s", what or "value", tostring(got), tostring(want)), 2)
  end
end

function M.near(got, want, eps, what)
  if type(got) ~= "number" or math.abs(got - want) > eps then
    error(string.format("%s: got %s, want %s +- %s", what or "value", tostring(got),
                        tostring(want), tostring(eps)), 2)
  end
end

-- Runs the cases; returns an empty hooks table, or raises with the failures.
function M.run()
  local failed = {}
  for _, c in ipairs(cases) do
    local ok, err = pcall(c.fn)
    if not ok then
      failed[#failed + 1] = c.name .. ": " .. tostring(err)
    end
  end
  cases = {}
  if #failed > 0 then
    error(#failed .. " failed: " .. table.concat(failed, "; "), 0)
  end
  return {}
end

-- A clock the test moves by hand.
function M.clock(start)
  local t = start or 1000
  return function() return t end, function(dt) t = t + dt end
end

return M
