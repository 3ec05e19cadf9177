-- SPDX-License-Identifier: MIT
-- wrk script for bench-api.sh: GET /devices/{id} of a random device among NDEV (bench-000000..).
-- The Authorization header comes from wrk's -H option.
local ndev = tonumber(os.getenv("NDEV") or "10000")
local path_fmt = os.getenv("GET_PATH") or "/devices/bench-%06d?api-version=2021-04-12"

function init(args)
        math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
        local path = path_fmt
        if path:find("%%") then path = string.format(path_fmt, math.random(0, ndev - 1)) end
        return wrk.format("GET", path)
end

