-- SPDX-License-Identifier: MIT
-- wrk script for bench-api.sh: PATCH /twins/{id} of a random device among NDEV with a small
-- desired patch and If-Match: *. The Authorization header comes from wrk's -H option.
local ndev = tonumber(os.getenv("NDEV") or "10000")
local n = 0

function init(args)
        math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
        n = n + 1
        local path = string.format("/twins/bench-%06d?api-version=2021-04-12", math.random(0, ndev - 1))
        local body = string.format('{"properties":{"desired":{"n":%d}}}', n)
        -- wrk.format does not merge wrk.headers (-H) into an explicit table: copy them.
        local headers = {}
        for k, v in pairs(wrk.headers) do headers[k] = v end
        headers["Content-Type"] = "application/json"
        headers["If-Match"] = "*"
        return wrk.format("PATCH", path, headers, body)
end

