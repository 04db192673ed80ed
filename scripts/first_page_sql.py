# Prints FirstFeedPage's SQL (HeraldStore/Feed.swift) for pgbench: $1 organisation, $2 user, $3 now,
# $4 the page size + 1 (21), as scripts/bench.sh binds them.
import re, sys
source = open("Sources/HeraldStore/Feed.swift").read()
start = source.index("struct FirstFeedPage")
sql = re.search(r'static let sql = """\n(.*?)\n\s*"""', source[start:], re.S).group(1)
sql = sql.replace("$1", ":org::uuid").replace("$2", ":usr::uuid").replace("$3", "now()").replace("$4", "21")
print("\n".join(line.strip() for line in sql.splitlines()) + ";")
