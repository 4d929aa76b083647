-- wrk script: sends pre-signed iGV callbacks, one request id per request.
--
-- Usage: wrk ... -s callbacks.lua URL -- IDS_FILE MODE THREADS
--   IDS_FILE  first line: the JSON body; then one "request_id timestamp signature"
--             per line (written by benchmarks/harness.py).
--   MODE      "first":  every request carries an id no other request of the run
--                       carries; thread i takes lines i, i+T, i+2T... so threads
--                       never share an id. When a thread runs out it does NOT
--                       wrap around (that would turn first deliveries into
--                       duplicates): it sends to /bench-ids-exhausted (a 404),
--                       stops, and done() reports it so the harness fails loudly.
--             "replay": the same walk, wrapping around: every request is a duplicate.
--   THREADS   wrk's -t, to split the file into disjoint slices.
--
-- done() prints one line "BENCH-RESULT {json}" that the harness parses.

local threads = {}
local thread_count = 0

function setup(thread)
   -- Runs in the main state before the thread's init(); the global it sets is
   -- the thread's slice number.
   thread:set("slice", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

-- Globals, so that done() can read them with thread:get().
sent = 0
received = 0
ok = 0
exhausted = 0
statuses = {}

local ids, stamps, signatures = {}, {}, {}
local count, position = 0, 1
local body, mode
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   local path, slices = args[1], tonumber(args[3])
   mode = args[2]
   if mode ~= "first" and mode ~= "replay" then
      error("callbacks.lua: MODE must be first or replay, not " .. tostring(mode))
   end
   local file = assert(io.open(path, "r"))
   body = file:read("*l")
   local line_number = 0
   for line in file:lines() do
      if line_number % slices == slice then
         local id, stamp, signature = line:match("^(%S+) (%S+) (%S+)$")
         count = count + 1
         ids[count], stamps[count], signatures[count] = id, stamp, signature
      end
      line_number = line_number + 1
   end
   file:close()
   if count == 0 then
      error("callbacks.lua: no ids for thread " .. slice .. " in " .. path)
   end
end

function request()
   if position > count then
      if mode == "replay" then
         position = 1
      else
         exhausted = exhausted + 1
         wrk.thread:stop()
         return wrk.format("POST", "/bench-ids-exhausted", headers, body)
      end
   end
   headers["X-Request-Id"] = ids[position]
   headers["X-Timestamp"] = stamps[position]
   headers["X-Signature"] = signatures[position]
   position = position + 1
   sent = sent + 1
   return wrk.format("POST", nil, headers, body)
end

function response(status, response_headers, response_body)
   received = received + 1
   if status == 200 then
      ok = ok + 1
   end
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local total = { sent = 0, received = 0, ok = 0, exhausted = 0 }
   local status_counts = {}
   for _, thread in ipairs(threads) do
      for name, _ in pairs(total) do
         total[name] = total[name] + thread:get(name)
      end
      for status, n in pairs(thread:get("statuses")) do
         status_counts[status] = (status_counts[status] or 0) + n
      end
   end
   local status_parts = {}
   for status, n in pairs(status_counts) do
      table.insert(status_parts, string.format('"%d": %d', status, n))
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}, '
         .. '"sent": %d, "received": %d, "ok": %d, "exhausted": %d, "statuses": {%s}}\n',
      summary.requests, summary.duration, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max,
      total.sent, total.received, total.ok, total.exhausted,
      table.concat(status_parts, ", ")))
end
