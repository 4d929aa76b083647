import uuid
from tests.system.test_storm import storm, check_exactly_once
from tests.system.callbacks import mixed

def test_probe(start_server, sqlite_url, report):
    server = start_server(sqlite_url, workers=4, threads=4, duplicate_wait=0.01, receiver_delay=0.03, sqlite_timeout=0.02)
    cbs = mixed(60, uuid.uuid4().hex[:12])
    try:
        result = storm(server, cbs, 10, threads=16)
        report(result.line("probe", 60, 10))
    finally:
        print(server.log()[-6000:])
