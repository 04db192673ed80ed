import AsyncHTTPClient
import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import NIOHTTP1
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

#if canImport(Glibc)
    import Glibc
#endif

/// Issue 8: defects found by using Herald as an integrator, a frontend and an admin would, at
/// the request boundary (errors, logs, contract) and in the engine's gaps.
@Suite("Issue 8: the request boundary")
struct BoundaryDefectTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test("a chunked body over the limit is a 413 problem on every JSON operation, also without login")
    func chunkedBodyOverLimit() async throws {
        // setup
        let app = try env.application()
        try await app.test(.live) { client in
            let http = HTTPClient(eventLoopGroupProvider: .singleton)
            defer { _ = http.shutdown() }
            for path in ["/v1/auth/refresh", "/v1/auth/logout", "/v1/auth/token"] {
                // act: 1 MiB in 64 KiB chunks with no Content-Length (the test limit is 64 KiB)
                var request = HTTPClientRequest(url: "http://127.0.0.1:\(client.port!)\(path)")
                request.method = .POST
                request.headers.add(name: "Content-Type", value: "application/json")
                let (chunks, writer) = AsyncStream.makeStream(of: ByteBuffer.self)
                for _ in 0..<16 { writer.yield(ByteBuffer(repeating: UInt8(ascii: " "), count: 64 * 1024)) }
                writer.finish()
                request.body = .stream(chunks, length: .unknown)
                let response = try await http.execute(request, timeout: .seconds(30))
                let body = try await response.body.collect(upTo: 1 << 20)
                // check
                #expect(response.status == .payloadTooLarge, "\(path)")
                #expect(response.headers.first(name: "Content-Type") == "application/problem+json")
                #expect(String(buffer: body).contains("larger than 65536 bytes"))
            }
        }
    }

    @Test("a body shorter than its Content-Length does not hold the connection: closed after HERALD_HTTP_IDLE_SECONDS")
    func shortBodyIsClosed() async throws {
        try await StreamServer.with(configure: { $0.httpIdleSeconds = 1 }) { servers in
            // act: 11 bytes of a promised 100, then silence; the reply is waited for up to 15 s
            let request =
                "POST /v1/schedules HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\": 1}"
            let (_, closed, waited) = try await rawExchange(port: servers[0].port, Array(request.utf8))
            // check: the server closed it (end of stream), well before the client's 15 s
            #expect(closed)
            #expect(waited < .seconds(10))
        }
    }

    @Test(
        "a first request the decoder refuses is answered (431 for header fields too large, 400 else) and closed; a head that never ends is closed after the idle timeout (a trial: held open for good)"
    )
    func unreadableHeadsAnswered() async throws {
        try await StreamServer.with(configure: { $0.httpIdleSeconds = 1 }) { servers in
            let port = servers[0].port
            let big = try await rawExchange(
                port: port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 100_000))\r\n\r\n".utf8))
            #expect(big.reply.hasPrefix("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "\(big.reply.prefix(200))")
            #expect(big.reply.contains("application/problem+json") && big.reply.contains("head is larger than Herald reads"))
            #expect(big.closed && big.waited < .seconds(10))
            let many = (0..<1_100).map { "X-\($0): a\r\n" }.joined()
            let fields = try await rawExchange(port: port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\(many)\r\n".utf8))
            #expect(fields.reply.hasPrefix("HTTP/1.1 431 "), "\(fields.reply.prefix(200))")
            let garbage = try await rawExchange(port: port, [0x16, 0x03, 0x01] + Array("garbage\r\n\r\n".utf8))
            #expect(garbage.reply.hasPrefix("HTTP/1.1 400 Bad Request\r\n") && garbage.reply.contains("\"status\":400"), "\(garbage.reply)")
            #expect(garbage.closed)
            // A head that never ends: closed at the idle timeout, with nothing to answer.
            let half = try await rawExchange(port: port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\n".utf8))
            #expect(half.reply.isEmpty && half.closed && half.waited < .seconds(10), "\(half.reply)")
            // A whole request is served as before.
            let fine = try await rawExchange(port: port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
            #expect(fine.reply.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(fine.reply.prefix(200))")
        }
    }

    @Test(
        "a graceful shutdown closes connections whose first request's head is not finished (a trial: they held SIGTERM to its 25 s limit)"
    )
    func shutdownClosesHalfSentHeads() async throws {
        let keys = try StreamServeProcess.keysDirectory()
        defer { try? FileManager.default.removeItem(atPath: keys) }
        let server = try await StreamServeProcess.start(keys: keys)
        defer { server.kill() }
        let port = server.port
        // Five connections that sent half a head each, held open.
        let sockets = try await offPool { () -> [Int32] in
            (0..<5).map { _ in
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var address = sockaddr_in()
                address.sin_family = sa_family_t(AF_INET)
                address.sin_port = in_port_t(UInt16(port).bigEndian)
                address.sin_addr.s_addr = inet_addr("127.0.0.1")
                _ = withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                _ = "GET /healthz HTTP/1.1\r\nHost: x\r\n".withCString { send(fd, $0, strlen($0), 0) }
                return fd
            }
        }
        defer { for fd in sockets { close(fd) } }
        try await Task.sleep(for: .milliseconds(200)) // the server has read them
        let took = try await server.terminate()
        #expect(took < .seconds(10), "SIGTERM with five half-sent heads open took \(took)")
    }

    @Test("the audit log lists entries whose before/after are arrays (role assignments), also by target")
    func auditLogWithArrays() async throws {
        // setup: assigning roles writes before/after as JSON arrays
        try await withOrganisation { org, client in
            let member = org.memberID.uuidString.lowercased()
            let admin = try await org.store { tx in try await tx.builtinRole(.admin).id.uuidString.lowercased() }
            #expect(
                try await client.send(.put, "/v1/users/\(member)/roles", token: org.ownerToken, json: #"{"role_ids": ["\#(admin)"]}"#)
                    .status == .ok)
            // act
            let all = try await client.send(.get, "/v1/audit-log", token: org.ownerToken)
            let byTarget = try await client.send(.get, "/v1/audit-log?target_id=\(member)", token: org.ownerToken)
            // check
            #expect(all.status == .ok)
            #expect(byTarget.status == .ok)
            let items = try #require(byTarget.json["items"] as? [[String: Any]])
            let set = try #require(items.first { $0["action"] as? String == "user.roles.set" })
            #expect((set["after"] as? [[String: Any]])?.first?["key"] as? String == "admin")
            #expect(set["before"] is [Any])
        }
    }

    @Test("a stored value Herald cannot read fails that request with a logged 500; the log holds no credential and no payload")
    func storedValueFaultIsA500WithoutSecrets() async throws {
        // setup
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let key = try await org.serviceKey()
        let log = CapturedLog()
        let app = try env.application(logger: log.logger())
        try await app.test(.router) { client in
            let sent = try await client.send(
                .post, "/v1/events", token: key,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "ok"}}"#)
            let eventID = try #require(sent.json["event_id"] as? String)
            // act: one unreadable value in each of two places
            try await org.store { tx in
                try await tx.query("UPDATE events SET counts = '[1, 2]'::jsonb WHERE id = \(UUID(uuidString: eventID)!)")
                try await tx.query(
                    #"UPDATE organisations SET settings = settings || '{"throttle_per_minute": "oops"}'::jsonb WHERE id = \#(org.id)"#)
            }
            let read = try await client.send(.get, "/v1/events/\(eventID)", token: key)
            let notify = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "PAYLOAD-SECRET-4411"}}"#)
            let still = try await client.send(.get, "/v1/events", token: key)
            // check: 500s (not all-zero counts, not a 4xx), the process goes on, the logs say
            // which request failed and why without any credential or payload value
            #expect(read.isProblem(.internalServerError))
            #expect(notify.isProblem(.internalServerError))
            #expect(still.status == .internalServerError || still.status == .ok)
            let text = log.text
            #expect(text.contains("request failed"))
            #expect(text.contains("events.counts"))
            #expect(!text.contains(key))
            #expect(!text.contains(String(key.split(separator: ".").last!)))
            #expect(!text.contains(org.ownerToken))
            #expect(!text.contains("PAYLOAD-SECRET-4411"))
            #expect(!text.lowercased().contains("authorization"))
        }
    }

    @Test("the default sender address is one Herald accepts; a bad HERALD_SMTP_FROM stops the start, not every email")
    func senderAddressIsCheckedAtStart() throws {
        let configuration = try AppConfiguration.fromEnvironment(["DATABASE_URL": "postgres://u@127.0.0.1/db"])
        #expect((try? Validate.emailAddress(configuration.smtpFrom)) != nil)
        #expect(throws: ConfigurationError.self) {
            try AppConfiguration.fromEnvironment(["DATABASE_URL": "postgres://u@127.0.0.1/db", "HERALD_SMTP_FROM": "herald@localhost"])
        }
    }

    @Test("an operator's wrong values stop the start naming the variable (trial: some crashed later, spun or were misread)")
    func operatorValuesAreRangeChecked() throws {
        let base = ["DATABASE_URL": "postgres://u@127.0.0.1/db"]
        let refused: [(String, String, String)] = [
            ("HERALD_PORT", "99999", "1 to 65535"), ("HERALD_PORT", "-1", "1 to 65535"),
            ("HERALD_MAX_BODY_BYTES", "-1", "1024 to"), ("HERALD_WORKERS", "-1", "0 to 4096"),
            ("HERALD_WORKER_POLL_MS", "0", "10 to"), ("HERALD_SMTP_TIMEOUT", "0", "1.0 to"),
            ("HERALD_WEBHOOK_TIMEOUT", "-1", "0.1 to"), ("HERALD_RETRY_BASE_SECONDS", "-1", "0.001 to"),
            ("HERALD_RETRY_FACTOR", "0", "1.0 to"), ("HERALD_ACCESS_TOKEN_TTL", "-5", "10.0 to"),
            ("HERALD_LOGIN_ATTEMPTS_PER_ACCOUNT", "-1", "1 to"), ("HERALD_LOGIN_WINDOW", "-5", "1.0 to"),
            ("HERALD_STREAM_SWEEP_SECONDS", "-1", "0.0 to"), ("HERALD_STREAMS_PER_INSTANCE", "0", "HERALD_STREAMS_PER_INSTANCE=0"),
            ("HERALD_PUBLIC_URL", "not-a-url", "http or https"), ("HERALD_PUBLIC_URL", "ftp://x.example", "http or https"),
            ("HERALD_SMTP_URL", "smtp://127.0.0.1:2525?starttls=require", "one value: required"),
            ("HERALD_SMTP_URL", "smtp://", "no host"), ("HERALD_SMTP_URL", "smtp://mail.example:99999", "URL"),
            ("HERALD_SMTP_URL", "smtps://mail.example?starttls=required", "does not apply"),
            ("HERALD_SMTP_URL", "smtp://mail.example?tls=on", "unknown parameter"),
            ("HERALD_SMTP_URL", "http://mail.example", "smtp or smtps"),
        ]
        for (name, value, words) in refused {
            #expect(throws: ConfigurationError.self, "\(name)=\(value)") {
                try AppConfiguration.fromEnvironment(base.merging([name: value]) { $1 })
            }
            do {
                _ = try AppConfiguration.fromEnvironment(base.merging([name: value]) { $1 })
            } catch {
                #expect("\(error)".hasPrefix(name) && "\(error)".contains(words), "\(error)")
            }
        }
        // Credentials in the URL are refused without being repeated.
        do {
            _ = try AppConfiguration.fromEnvironment(base.merging(["HERALD_SMTP_URL": "smtp://me:s3cret@mail.example"]) { $1 })
            Issue.record("credentials in HERALD_SMTP_URL were accepted")
        } catch {
            #expect("\(error)".contains("HERALD_SMTP_PASSWORD") && !"\(error)".contains("s3cret"), "\(error)")
        }
        let accepted = try AppConfiguration.fromEnvironment(
            base.merging([
                "HERALD_SMTP_URL": "smtp://mail.example:587?starttls=required", "HERALD_PUBLIC_URL": "https://herald.example.com/",
                "HERALD_STREAM_SWEEP_SECONDS": "0", "HERALD_WORKERS": "0", "HERALD_RETRY_BASE_SECONDS": "0.5",
                "HERALD_RETRY_MAX_SECONDS": "2",
            ]) { $1 })
        #expect(accepted.publicURL == "https://herald.example.com" && accepted.workers == 0)
        #expect(throws: ConfigurationError.self) {
            try AppConfiguration.fromEnvironment(
                base.merging(["HERALD_RETRY_BASE_SECONDS": "60", "HERALD_RETRY_MAX_SECONDS": "10"]) { $1 })
        }
    }

    @Test("the workers' sends in flight and their shared connections: defaults, the setting, and a bad value refused at start")
    func workerConnectionsAreASettingOfTheirOwn() throws {
        let base = ["DATABASE_URL": "postgres://u@127.0.0.1/db"]
        let defaults = try AppConfiguration.fromEnvironment(base)
        #expect(defaults.workers == 64 && defaults.workerBatchSize == 64 && defaults.deliveryConnections == 16)
        // Emails are capped apart from the slots (a relay limits one client's connections); digests
        // take a quarter of the slots, at most 8.
        #expect(defaults.smtpConnections == 40 && defaults.digestConcurrency == 8)
        #expect(try AppConfiguration.fromEnvironment(base.merging(["HERALD_WORKERS": "8"]) { $1 }).digestConcurrency == 2)
        #expect(try AppConfiguration.fromEnvironment(base.merging(["HERALD_SMTP_CONNECTIONS": "10"]) { $1 }).smtpConnections == 10)
        for bad in ["0", "1001", "ten"] {
            #expect(throws: ConfigurationError.self, "HERALD_SMTP_CONNECTIONS=\(bad)") {
                try AppConfiguration.fromEnvironment(base.merging(["HERALD_SMTP_CONNECTIONS": bad]) { $1 })
            }
        }
        let few = try AppConfiguration.fromEnvironment(base.merging(["HERALD_WORKERS": "4"]) { $1 })
        #expect(few.deliveryConnections == 4, "never more connections than sends in flight by default")
        let many = try AppConfiguration.fromEnvironment(base.merging(["HERALD_WORKERS": "256", "HERALD_WORKER_CONNECTIONS": "8"]) { $1 })
        #expect(many.workers == 256 && many.deliveryConnections == 8)
        for bad in ["0", "1001", "eight"] {
            #expect(throws: ConfigurationError.self, "HERALD_WORKER_CONNECTIONS=\(bad)") {
                try AppConfiguration.fromEnvironment(base.merging(["HERALD_WORKER_CONNECTIONS": bad]) { $1 })
            }
        }
    }

    @Test("the pool: no keep-alive queries by default; the setting, and bad values refused at start")
    func poolSettings() throws {
        let base = ["DATABASE_URL": "postgres://u@127.0.0.1/db"]
        let defaults = try AppConfiguration.fromEnvironment(base)
        #expect(defaults.databasePoolSize == 20 && defaults.databaseKeepAlive == 0)
        #expect(try PostgresClient.Configuration.fromURL(base["DATABASE_URL"]!).options.keepAliveBehavior == nil)
        let set = try AppConfiguration.fromEnvironment(
            base.merging(["HERALD_DATABASE_POOL_SIZE": "8", "HERALD_DATABASE_KEEPALIVE_SECONDS": "45"]) { $1 })
        #expect(set.databasePoolSize == 8 && set.databaseKeepAlive == 45)
        var pool = try PostgresClient.Configuration.fromURL(base["DATABASE_URL"]!)
        pool.keepAlive(every: set.databaseKeepAlive)
        #expect(pool.options.keepAliveBehavior?.frequency == .seconds(45))
        for bad in [
            ["HERALD_DATABASE_POOL_SIZE": "0"], ["HERALD_DATABASE_KEEPALIVE_SECONDS": "-5"], ["HERALD_DATABASE_KEEPALIVE_SECONDS": "0.5"],
            ["HERALD_DATABASE_KEEPALIVE_SECONDS": "often"],
        ] {
            #expect(throws: ConfigurationError.self, "\(bad)") { try AppConfiguration.fromEnvironment(base.merging(bad) { $1 }) }
        }
    }

    @Test("tasks run on the event loops unless HERALD_TASKS_ON_EVENT_LOOPS=0; another value is refused at start")
    func tasksOnEventLoopsIsASetting() throws {
        let base = ["DATABASE_URL": "postgres://u@127.0.0.1/db"]
        #expect(try AppConfiguration.fromEnvironment(base).tasksOnEventLoops)
        #expect(try !AppConfiguration.fromEnvironment(base.merging(["HERALD_TASKS_ON_EVENT_LOOPS": "0"]) { $1 }).tasksOnEventLoops)
        #expect(throws: ConfigurationError.self) {
            try AppConfiguration.fromEnvironment(base.merging(["HERALD_TASKS_ON_EVENT_LOOPS": "yes"]) { $1 })
        }
    }

    @Test("signed-link tokens (credentials) never reach the log")
    func linkTokensAreNotLogged() async throws {
        let log = CapturedLog()
        let app = try env.application(logger: log.logger())
        let token = "v1.k1.SECRETLINKTOKEN0123456789abcdef.signature"
        try await app.test(.router) { client in
            let click = try await client.send(.get, "/v1/links/\(token)")
            let unsubscribe = try await client.send(.get, "/v1/unsubscribe/\(token)")
            #expect(click.isProblem(.notFound))
            #expect(unsubscribe.isProblem(.notFound))
        }
        #expect(log.text.contains("request"))
        #expect(!log.text.contains("SECRETLINKTOKEN"))
    }

    @Test("a template nesting sections too deep is a 422 wherever a template is given, and the server goes on (a trial's crashed it)")
    func deepTemplatesRefused() async throws {
        try await withCatalogue { org, catalogue, client in
            let deep = String(repeating: "{{#a}}", count: 800) + "x" + String(repeating: "{{/a}}", count: 800)
            let type = catalogue.taskAssigned.uuidString
            let cases: [(HTTPRequest.Method, String, String, String)] = [
                (.put, "/v1/notification-types/\(type)/templates/in_app/de", #"{"subject": "s", "body": "\#(deep)"}"#, "body"),
                (
                    .post, "/v1/notification-types/\(type)/preview",
                    #"{"channel": "in_app", "template": {"subject": "s", "body": "\#(deep)"}}"#, "template.body"
                ),
                (.put, "/v1/digest-templates/de", #"{"subject": "s", "body": "b", "html": "\#(deep)"}"#, "html"),
            ]
            for (method, path, json, field) in cases {
                let response = try await client.send(method, path, token: org.ownerToken, json: json)
                #expect(response.isProblem(.unprocessableContent), "\(path): \(response.status)")
                #expect(
                    (response.json["detail"] as? String)?.hasPrefix("\(field): line 1, column ") == true, "\(response.text.prefix(300))")
                #expect(response.text.contains("more than 100 sections"))
            }
            #expect(try await client.send(.get, "/v1/me", token: org.ownerToken).status == .ok)
        }
    }

    @Test("what openapi.yaml declares as a maximum length, the server enforces (422 naming the field)")
    func declaredMaxLengths() async throws {
        try await withCatalogue { org, catalogue, client in
            let long = String(repeating: "x", count: 1001)
            let cases: [(HTTPRequest.Method, String, String, String)] = [
                (.post, "/v1/roles", #"{"key": "r1", "name": "R", "description": "\#(long)", "permissions": []}"#, "description"),
                (.post, "/v1/groups", #"{"key": "g1", "name": "G", "description": "\#(long)"}"#, "description"),
                (.post, "/v1/categories", #"{"key": "c1", "name": "C", "description": "\#(long)"}"#, "description"),
                (.patch, "/v1/categories/\(catalogue.activity.uuidString)", #"{"description": "\#(long)"}"#, "description"),
                (
                    .post, "/v1/notification-types", #"{"key": "T1", "category": "activity", "name": "T", "description": "\#(long)"}"#,
                    "description"
                ),
                (.patch, "/v1/notification-types/\(catalogue.taskAssigned.uuidString)", #"{"description": "\#(long)"}"#, "description"),
                (
                    .put, "/v1/notification-types/\(catalogue.taskAssigned.uuidString)/templates/in_app/en",
                    #"{"subject": "\#(long)", "body": "b"}"#, "subject"
                ),
                (
                    .put, "/v1/notification-types/\(catalogue.taskAssigned.uuidString)/templates/email/en",
                    #"{"subject": "s", "body": "\#(String(repeating: "y", count: 20001))"}"#, "body"
                ),
            ]
            for (method, path, json, field) in cases {
                let response = try await client.send(method, path, token: org.ownerToken, json: json)
                #expect(response.isProblem(.unprocessableContent), "\(method) \(path)")
                #expect(
                    (response.json["detail"] as? String)?.hasPrefix("\(field):") == true, "\(method) \(path): \(response.text.prefix(300))")
            }
            // exactly at the limit is accepted
            let atLimit = try await client.send(
                .post, "/v1/groups", token: org.ownerToken,
                json: #"{"key": "g2", "name": "G", "description": "\#(String(repeating: "é", count: 1000))"}"#)
            #expect(atLimit.status == .created)
        }
    }

    @Test("an update that names no field is a 400 and changes and audits nothing (the schemas' minProperties)")
    func emptyUpdates() async throws {
        try await withCatalogue { org, catalogue, client in
            let created = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "g-empty", "name": "G"}"#)
            let group = try #require(created.json["id"] as? String)
            let role = try #require(
                try await client.send(
                    .post, "/v1/roles", token: org.ownerToken, json: #"{"key": "r-empty", "name": "R", "permissions": []}"#
                )
                .json["id"] as? String)
            // Written directly: this app's destination guard refuses the local receiver.
            let endpoint = try await org.store { tx in
                try await tx.createEndpoint(
                    channel: .webhook, format: .standard, name: "Ward system", url: Peers.hook("empty-update").url, eventTypes: [],
                    secret: "whsec_" + Data(repeating: 7, count: 32).base64EncodedString())
            }
            let audited = { @Sendable in
                try await client.send(.get, "/v1/audit-log?limit=100", token: org.ownerToken).json["items"] as? [Any]
            }
            let before = try await audited()?.count
            var paths = [
                "/v1/organisation", "/v1/users/\(org.memberID.uuidString)", "/v1/groups/\(group)", "/v1/roles/\(role)",
                "/v1/categories/\(catalogue.activity.uuidString)", "/v1/notification-types/\(catalogue.taskAssigned.uuidString)",
            ]
            paths.append("/v1/endpoints/\(endpoint.id.uuidString)")
            for path in paths {
                let response = try await client.send(.patch, path, token: org.ownerToken, json: "{}")
                #expect(response.isProblem(.badRequest), "PATCH \(path): \(response.text.prefix(300))")
                #expect((response.json["detail"] as? String)?.contains("no field") == true, "\(response.text.prefix(300))")
            }
            #expect(try await audited()?.count == before)
            // One field is enough.
            let renamed = try await client.send(.patch, "/v1/groups/\(group)", token: org.ownerToken, json: #"{"name": "G2"}"#)
            #expect(renamed.status == .ok, "\(renamed.text)")
        }
    }

    @Test("nothing is silently ignored: a parameter given twice, or a body sent to an operation that takes none, is a 400")
    func nothingIgnored() async throws {
        try await withCatalogue { org, _, client in
            let twice = try await client.send(.get, "/v1/users?limit=1&limit=2", token: org.ownerToken)
            #expect(twice.isProblem(.badRequest) && twice.text.contains("limit") && twice.text.contains("more than once"), "\(twice.text)")
            // An array parameter repeats.
            let tags = try await client.send(.get, "/v1/me/notifications?tag=team:a&tag=team:b", token: org.memberToken)
            #expect(tags.status == .ok, "\(tags.text)")
            let body = try await client.send(.post, "/v1/me/stream-tickets", token: org.memberToken, json: #"{"ttl": 600}"#)
            #expect(body.isProblem(.badRequest) && body.text.contains("takes no request body"), "\(body.text)")
            // An empty object, as some clients send with every POST, is nothing.
            for nothing in ["{}", "{ }", " {\n} "] {
                let empty = try await client.send(.post, "/v1/me/stream-tickets", token: org.memberToken, json: nothing)
                #expect(empty.status.code / 100 == 2, "\(nothing): \(empty.text)")
            }
            #expect(try await client.send(.post, "/v1/me/stream-tickets", token: org.memberToken).status.code / 100 == 2)
        }
    }

    @Test(
        "a body must be RFC 8259 JSON: a trailing comma, a key given twice or a number beyond a float is a 400 naming where, and nothing is sent"
    )
    func strictJSON() async throws {
        // The reader itself, case by case.
        let accepted = [
            #"{}"#, #"[]"#, #" {"a": [1, -0.5, 2e10, 1E-3, true, false, null, "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"]} "#,
            #"{"a": {"b": 1}, "b": {"b": 2}}"#, #""text""#, "12",
        ]
        for text in accepted { #expect(StrictJSON.problem(in: Data(text.utf8)) == nil, "\(text)") }
        let refused: [(String, String)] = [
            (#"{"a": 1,}"#, "a comma before } at line 1, column 9"),
            ("[1,\n 2,\n]", "a comma before ] at line 3, column 1"),
            (#"{"a": 1, "a": 2}"#, #"body: the key "a" appears twice"#),
            (#"{"payload": {"title": "x", "t\u0069tle": "y"}}"#, #"payload: the key "title" appears twice"#),
            (#"{"payload": {"amount": 1e400}}"#, "payload.amount: the number 1e400 is beyond the range"),
            (#"{"a": [0, -1e999]}"#, "a[1]: the number -1e999"),
            (#"{"a": 01}"#, "leading zero"), (#"{"a": 'x'}"#, "expected a value"), (#"{"a": "\x"}"#, #"\x is not an escape"#),
            ("{\"a\": \"line\nbreak\"}", "a control character"), (#"{"a": 1} {}"#, "more after the end"),
            (#"{"a": tru}"#, "expected a value"), (#"{"a" 1}"#, "a colon after a key"), (#"{"a": 1"#, "a comma or }"),
            (String(repeating: "[", count: 101) + String(repeating: "]", count: 101), "deeper than 100 levels"),
        ]
        for (text, words) in refused {
            let problem = StrictJSON.problem(in: Data(text.utf8))
            #expect(problem?.contains(words) == true, "\(text): \(problem ?? "accepted")")
        }
        #expect(StrictJSON.problem(in: Data((String(repeating: "[", count: 100) + String(repeating: "]", count: 100)).utf8)) == nil)
        // Bytes that are not UTF-8 in a string say where (a trial got the decoders' "not valid JSON").
        for bytes: [UInt8] in [[0xFF], [0xC3], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xE2, 0x82]] {
            let text = Array(#"{"name": "ab"#.utf8) + bytes + Array(#""}"#.utf8)
            let problem = StrictJSON.problem(in: Data(text))
            #expect(
                problem
                    == "The request body is not valid JSON: bytes that are not UTF-8 in a string (JSON text is UTF-8) at line 1, column 13.",
                "\(bytes): \(problem ?? "accepted")")
        }
        #expect(StrictJSON.problem(in: Data(#"{"name": "é€😀"}"#.utf8)) == nil)

        // Through the API: refused before anything is written.
        try await withCatalogue { org, _, client in
            let member = org.memberID.uuidString.lowercased()
            let cases = [
                #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "A"},}"#,
                #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "A", "title": "B"}}"#,
                #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "A", "amount": 1e400}}"#,
            ]
            func eventCount() async throws -> Int? {
                (try await client.send(.get, "/v1/events", token: org.ownerToken).json["items"] as? [Any])?.count
            }
            let before = try await eventCount()
            for body in cases {
                let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
                #expect(sent.isProblem(.badRequest), "\(body): \(sent.text)")
            }
            let duplicate = try await client.send(.post, "/v1/events", token: org.ownerToken, json: cases[1])
            #expect(
                (duplicate.json["detail"] as? String)?.hasPrefix(#"payload: the key "title" appears twice"#) == true, "\(duplicate.text)")
            #expect(try await eventCount() == before)
            let fine = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "A", "amount": 1e300}}"#)
            #expect(fine.status == .accepted, "\(fine.text)")
        }
    }

    @Test("a user's attributes hold at most 16 KiB of JSON: more is a 422 naming them, on create and on update, and nothing changes")
    func attributesBounded() async throws {
        try await withCatalogue { org, _, client in
            let fits = String(repeating: "x", count: 16 * 1024 - 20)
            let big = String(repeating: "x", count: 16 * 1024)
            let created = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: #"{"email": "a@\#(org.slug).example", "display_name": "A", "attributes": {"notes": "\#(fits)"}}"#)
            #expect(created.status == .created, "\(created.text)")
            let id = try #require(created.json["id"] as? String)
            let refused = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: #"{"email": "b@\#(org.slug).example", "display_name": "B", "attributes": {"notes": "\#(big)"}}"#)
            #expect(refused.isProblem(.unprocessableContent), "\(refused.text.prefix(300))")
            #expect(
                (refused.json["detail"] as? String)?.hasPrefix("attributes: is 1639") == true
                    && refused.text.contains("more than the 16384"), "\(refused.text.prefix(300))")
            let patched = try await client.send(
                .patch, "/v1/users/\(id)", token: org.ownerToken, json: #"{"attributes": {"notes": "\#(big)"}}"#)
            #expect(patched.isProblem(.unprocessableContent), "\(patched.text.prefix(300))")
            let user = try await client.send(.get, "/v1/users/\(id)", token: org.ownerToken)
            #expect(((user.json["attributes"] as? [String: Any])?["notes"] as? String)?.count == fits.count)
        }
    }

    @Test("a link is an RFC 3986 URL, as openapi.yaml's pattern says: what is stored can be shown again as a uri")
    func linkURLs() throws {
        for good in [
            "https://app.example/tasks/42?x=1&y=%C3%A9#top", "http://localhost:8080/p", "HTTPS://A.example", "https://a.example/#/route?x",
        ] {
            #expect(throws: Never.self, "\(good)") { try Validate.linkURL(good, field: "url") }
        }
        for bad in [
            "HTtp://XmxTFT0qG#%d2#", "https://例え.jp/", "https://app.example/a b", "ftp://app.example", "https://", "https://a.example/%zz",
        ] {
            #expect(throws: ValidationError.self, "\(bad)") { try Validate.linkURL(bad, field: "url") }
        }
        // The contract's pattern is the validator's, at every url it declares.
        let spec = try String(contentsOfFile: "openapi.yaml", encoding: .utf8)
        let declared = spec.components(separatedBy: "pattern: '").dropFirst().map { $0.components(separatedBy: "', description")[0] }
            .filter { $0.hasPrefix("^[Hh][Tt][Tt][Pp]") }.map { $0.replacingOccurrences(of: "''", with: "'") }
        #expect(declared.count == 4 && declared.allSatisfy { $0 == Validate.linkURLPattern }, "\(declared)")
    }

    @Test("replacing or deleting a template moves its type's updated_at")
    func templateTouchesItsType() async throws {
        try await withCatalogue { org, catalogue, client in
            let path = "/v1/notification-types/\(catalogue.taskAssigned.uuidString)"
            func updatedAt() async throws -> String {
                try #require(try await client.send(.get, path, token: org.ownerToken).json["updated_at"] as? String)
            }
            // Set back in time, so that a change shows whatever the clock's resolution.
            let age = { @Sendable in
                try await org.store { tx in
                    try await tx.query(
                        "UPDATE notification_types SET updated_at = '2020-01-01T00:00:00Z' WHERE organisation_id = \(org.id) AND id = \(catalogue.taskAssigned)"
                    )
                }
            }
            try await age()
            #expect(try await updatedAt() == "2020-01-01T00:00:00Z")
            let put = try await client.send(
                .put, path + "/templates/email/fr", token: org.ownerToken, json: #"{"subject": "s", "body": "b"}"#)
            #expect(put.status == .ok, "\(put.text)")
            #expect(try await updatedAt() > "2020-01-01T00:00:00Z")
            try await age()
            #expect(try await client.send(.delete, path + "/templates/email/fr", token: org.ownerToken).status == .noContent)
            #expect(try await updatedAt() > "2020-01-01T00:00:00Z")
            // A template that is not there is a 404, as a digest template's is, and changes nothing.
            try await age()
            let again = try await client.send(.delete, path + "/templates/email/fr", token: org.ownerToken)
            #expect(again.status == .notFound && again.text.contains("template"), "\(again.text)")
            #expect(try await updatedAt() == "2020-01-01T00:00:00Z")
        }
    }

    @Test("a preference condition on event.type names types of the catalogue: a misspelt one is a 422 naming it (a trial)")
    func conditionTypesExist() async throws {
        try await withCatalogue { org, _, client in
            let misspelt = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json:
                    #"{"items": [{"category": "activity", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE", "conditions": [{"field": "event.type", "op": "in", "values": ["TASK_ASSIGNED", "TASK_ASIGNED"]}]}]}"#
            )
            #expect(misspelt.isProblem(.unprocessableContent) && misspelt.text.contains("TASK_ASIGNED"), "\(misspelt.text)")
            #expect(misspelt.text.contains("items[0].conditions[0]"), "\(misspelt.text)")
            let right = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json:
                    #"{"items": [{"category": "activity", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE", "conditions": [{"field": "event.type", "op": "in", "values": ["TASK_ASSIGNED"]}]}]}"#
            )
            #expect(right.status == .ok, "\(right.text)")
        }
    }

    @Test("an endpoint's event types must be types of the catalogue: a misspelt one is a 422 naming it, and nothing changes")
    func endpointEventTypesAreKnown() async throws {
        try await withCatalogue { org, _, client in
            // Written directly: this app's destination guard refuses the local receiver.
            let endpoint = try await org.store { tx in
                try await tx.createEndpoint(
                    channel: .webhook, format: .standard, name: "Ward system", url: Peers.hook("event-types").url, eventTypes: [],
                    secret: "whsec_" + Data(repeating: 7, count: 32).base64EncodedString())
            }
            let path = "/v1/endpoints/\(endpoint.id.uuidString)"
            let misspelt = try await client.send(
                .patch, path, token: org.ownerToken, json: #"{"event_types": ["TASK_ASSIGNED", "TASK_ASIGNED"]}"#)
            #expect(
                misspelt.isProblem(.unprocessableContent) && misspelt.text.contains("TASK_ASIGNED")
                    && misspelt.text.contains("event_types"), "\(misspelt.text)")
            #expect(try await org.store { tx in try await tx.endpoint(endpoint.id) }.eventTypes == [], "nothing changed")
            // Each once, as given.
            let fixed = try await client.send(
                .patch, path, token: org.ownerToken, json: #"{"event_types": ["TASK_ASSIGNED", "TASK_ASSIGNED"]}"#)
            #expect(fixed.status == .ok && (fixed.json["event_types"] as? [String]) == ["TASK_ASSIGNED"], "\(fixed.text)")
        }
    }

    @Test("a query or path parameter of the wrong kind or too long is a 400 naming it and what it takes")
    func malformedParameters() async throws {
        try await withCatalogue { org, catalogue, client in
            let type = catalogue.taskAssigned.uuidString
            let cases: [(HTTPRequest.Method, String, String, HTTPResponse.Status, String)] = [
                (.get, "/v1/users?limit=abc", "limit", .badRequest, "whole number"),
                (.get, "/v1/users?limit=1.5", "limit", .badRequest, "whole number"),
                (.get, "/v1/me/notifications?read=maybe", "read", .badRequest, "true or false"),
                (.get, "/v1/me/notifications?severity=BAD", "severity", .badRequest, "INFO, WARNING, CRITICAL"),
                (.get, "/v1/events?state=SCHEDULED", "state", .badRequest, #"scheduled, delivered, cancelled: write "scheduled"."#),
                (.get, "/v1/deliveries?status=sent", "status", .badRequest, #"write "SENT"."#),
                (.get, "/v1/deliveries?status=BOGUS", "status", .badRequest, "PENDING"),
                (.get, "/v1/deliveries?since=yesterday", "since", .badRequest, "RFC 3339"),
                (.get, "/v1/me/notifications?q=" + String(repeating: "x", count: 201), "q", .badRequest, "at most 200"),
                (.put, "/v1/notification-types/\(type)/templates/sms/en", "channel", .badRequest, "in_app, email"),
            ]
            for (method, path, name, status, says) in cases {
                let token = path.hasPrefix("/v1/me") ? org.memberToken : org.ownerToken
                let response = try await client.send(method, path, token: token, json: #"{"subject": "s", "body": "b"}"#)
                let detail = response.json["detail"] as? String ?? ""
                #expect(response.isProblem(status), "\(method) \(path.prefix(80)): \(response.text.prefix(300))")
                #expect(detail.hasPrefix("\(name)") && detail.contains(says), "\(path.prefix(80)): \(detail)")
                #expect(!detail.contains("Payload") && !detail.contains("convert"), "\(detail)")
            }
            // Well-formed values still work.
            for path in ["/v1/users?limit=5", "/v1/events?state=scheduled", "/v1/deliveries?status=SENT&since=2026-01-01T00:00:00Z"] {
                #expect(try await client.send(.get, path, token: org.ownerToken).status == .ok, "\(path)")
            }
            #expect(try await client.send(.get, "/v1/me/notifications?read=false&severity=INFO", token: org.memberToken).status == .ok)
        }
    }

    @Test("a body value of the wrong kind is a 400 naming its field and what it takes, in the contract's words, not the decoder's")
    func malformedBodyValues() async throws {
        try await withCatalogue { org, _, client in
            let event = #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "t"}, "#
            let cases: [(HTTPRequest.Method, String, String, String, String)] = [
                (.post, "/v1/events", event + #""deliver_at": "tomorrow"}"#, "deliver_at", "RFC 3339"),
                (.post, "/v1/events", event + #""severity": "LOW"}"#, "severity", "is not one of INFO, WARNING, CRITICAL"),
                (.post, "/v1/events", event + #""priority": "urgent"}"#, "priority", "is not one of low, normal, high, critical"),
                (.patch, "/v1/organisation", #"{"retention_days": 30.5}"#, "retention_days", "whole number"),
                (.patch, "/v1/organisation", #"{"retention_days": 99999999999999999999}"#, "retention_days", "whole number"),
                (
                    .patch, "/v1/organisation", #"{"name": "N", "organisation_id": "x"}"#, "organisation_id",
                    "is not a field this operation takes"
                ),
                (
                    .post, "/v1/endpoints", #"{"channel": "sms", "name": "n", "url": "https://hooks.example.org/x"}"#, "channel",
                    "is not one of webhook, chat"
                ),
                (.post, "/v1/endpoints", #"{"channel": "webhook", "name": "n", "url": 5}"#, "url", "must be a string"),
                (.post, "/v1/api-keys", #"{"name": 5, "role": "service"}"#, "name", "must be a string"),
                (.post, "/v1/api-keys", #"{"name": null, "role": "service"}"#, "name", "null is not accepted: give a value"),
                (
                    .patch, "/v1/me", #"{"digest_hour": null}"#, "digest_hour",
                    "null is not accepted: give a value, or leave the field out where it is optional. To clear digest_hour, send -1."
                ),
                (.post, "/v1/events", event + #""tags": [5]}"#, "tags[0]", "must be a string"),
                (
                    .post, "/v1/events", #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "\ud800"}}"#,
                    "The request body",
                    "\\uD800 is half of a UTF-16 surrogate pair without its other half"
                ),
                (
                    .put, "/v1/me/preferences",
                    #"{"items": [{"category": "outings", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE", "#
                        + #""conditions": [{"field": "d", "op": "weekday_in", "values": ["Monday"]}]}]}"#,
                    "items[0].conditions[0]", #""Monday" is not a weekday: monday … sunday, lowercase."#
                ),
            ]
            for (method, path, body, name, says) in cases {
                let token = path.hasPrefix("/v1/me") ? org.memberToken : org.ownerToken
                let response = try await client.send(method, path, token: token, json: body)
                let detail = response.json["detail"] as? String ?? ""
                #expect(response.isProblem(.badRequest), "\(method) \(path) \(body): \(response.text.prefix(300))")
                #expect(detail.hasPrefix(name) && detail.contains(says), "\(body): \(detail)")
                #expect(!detail.contains("Payload") && !detail.contains("initialize") && !detail.contains("oneOf"), "\(detail)")
            }
            #expect(
                try await client.send(.post, "/v1/events", token: org.ownerToken, json: event + #""severity": "INFO"}"#).status == .accepted
            )
        }
    }

    @Test("a JSON body sent as a form (curl -d without a Content-Type) is a 415 saying what to send, and writes nothing")
    func bodyInAnotherMediaType() async throws {
        try await withCatalogue { org, _, client in
            let event = #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "t"}}"#
            for type in ["application/x-www-form-urlencoded", "text/plain"] {
                let response = try await client.execute(
                    uri: "/v1/events", method: .post,
                    headers: [.authorization: "Bearer \(org.ownerToken)", .contentType: type], body: ByteBuffer(string: event))
                #expect(response.isProblem(.unsupportedMediaType), "\(type): \(response.text)")
                #expect((response.json["detail"] as? String ?? "").contains("Content-Type: application/json"), "\(response.text)")
            }
            let events = try await client.send(.get, "/v1/events", token: org.ownerToken)
            #expect((events.json["items"] as? [Any])?.isEmpty == true, "\(events.text)")
            // Without a Content-Type the body is read as JSON, as the contract's only media type.
            let bare = try await client.execute(
                uri: "/v1/events", method: .post, headers: [.authorization: "Bearer \(org.ownerToken)"], body: ByteBuffer(string: event))
            #expect(bare.status == .accepted, "\(bare.text)")
        }
    }

    @Test("gte and lte conditions take a number, a calendar date, a date-time or today through the API; other text is a 422")
    func boundConditions() async throws {
        try await withCatalogue { org, _, client in
            func put(_ value: String) async throws -> TestResponse {
                try await client.send(
                    .put, "/v1/me/preferences", token: org.memberToken,
                    json: #"{"items": [{"category": "outings", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE", "#
                        + #""conditions": [{"field": "starts_on", "op": "gte", "value": \#(value)}]}]}"#)
            }
            for value in [#""today""#, #""2027-03-31""#, "5", #""2027-03-31T08:00:00Z""#] {
                let saved = try await put(value)
                #expect(saved.status == .ok, "\(value): \(saved.text.prefix(300))")
                #expect(saved.text.contains(#""value":\#(value)"#), "\(value): \(saved.text.prefix(300))")
            }
            for value in [#""yesterday""#, #""2027-02-30""#] {
                let refused = try await put(value)
                #expect(refused.isProblem(.unprocessableContent), "\(value): \(refused.text.prefix(300))")
                #expect((refused.json["detail"] as? String)?.contains("conditions[0]") == true, "\(refused.text.prefix(300))")
            }
        }
    }

    @Test("a type's default channels are kept once each, in the order given")
    func defaultChannelsOnce() async throws {
        try await withCatalogue { org, catalogue, client in
            let created = try await client.send(
                .post, "/v1/notification-types", token: org.ownerToken,
                json: #"{"key": "TWICE", "category": "activity", "name": "Twice", "default_channels": ["email", "in_app", "email"]}"#)
            #expect(created.status == .created, "\(created.text.prefix(300))")
            #expect(created.json["default_channels"] as? [String] == ["email", "in_app"], "\(created.text.prefix(300))")
            let patched = try await client.send(
                .patch, "/v1/notification-types/\(catalogue.taskAssigned.uuidString)", token: org.ownerToken,
                json: #"{"default_channels": ["in_app", "in_app"]}"#)
            #expect(patched.json["default_channels"] as? [String] == ["in_app"], "\(patched.text.prefix(300))")
        }
    }

    @Test("unknown query parameters are refused (400 naming them); declared ones work")
    func unknownQueryParameters() async throws {
        try await withOrganisation { org, client in
            let typo = try await client.send(.get, "/v1/me/notifications?team=sales", token: org.memberToken)
            #expect(typo.isProblem(.badRequest))
            #expect((typo.json["detail"] as? String)?.contains("\"team\"") == true)
            #expect(try await client.send(.get, "/v1/me/notifications?read=false&limit=5", token: org.memberToken).status == .ok)
            #expect(try await client.send(.get, "/v1/users?bogus=1", token: org.ownerToken).isProblem(.badRequest))
            #expect(try await client.send(.get, "/v1/me?x=1", token: org.ownerToken).isProblem(.badRequest))
        }
    }

    @Test("an id parameter that is not a UUID is 422 everywhere, the audit log's target_id included")
    func auditTargetIDMustBeAUUID() async throws {
        try await withOrganisation { org, client in
            let response = try await client.send(.get, "/v1/audit-log?target_id=not-a-uuid", token: org.ownerToken)
            #expect(response.isProblem(.unprocessableContent))
            #expect((response.json["detail"] as? String)?.hasPrefix("target_id:") == true)
        }
    }

    @Test("group membership: a malformed and a missing group give one body; a missing user says user")
    func membershipNotFoundBodies() async throws {
        try await withOrganisation { org, client in
            let group = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "ward", "name": "Ward"}"#)
            let groupID = try #require(group.json["id"] as? String)
            let user = org.memberID.uuidString.lowercased()
            for method in [HTTPRequest.Method.put, .delete] {
                let malformed = try await client.send(method, "/v1/groups/not-a-uuid/members/\(user)", token: org.ownerToken)
                let missing = try await client.send(
                    method, "/v1/groups/\(UUID().uuidString.lowercased())/members/\(user)", token: org.ownerToken)
                #expect(malformed.isProblem(.notFound))
                #expect(malformed.text == missing.text)
                #expect(malformed.text.contains("No group with this id"))
                let noUser = try await client.send(
                    method, "/v1/groups/\(groupID)/members/\(UUID().uuidString.lowercased())", token: org.ownerToken)
                #expect(noUser.isProblem(.notFound))
                #expect(noUser.text.contains("No user with this id"))
            }
        }
    }

    @Test("a path id with anything after its 36 characters (a %00 and junk) is not that id: 404, and nothing is deleted")
    func pathIDWithTrailingJunk() async throws {
        try await withOrganisation { org, client in
            let group = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "ward", "name": "Ward"}"#)
            let groupID = try #require(group.json["id"] as? String)
            for suffix in ["%00abc", "%00", "abc", "%20"] {
                #expect(try await client.send(.get, "/v1/groups/\(groupID)\(suffix)", token: org.ownerToken).isProblem(.notFound))
                #expect(try await client.send(.delete, "/v1/groups/\(groupID)\(suffix)", token: org.ownerToken).isProblem(.notFound))
            }
            #expect(try await client.send(.get, "/v1/groups/\(groupID)", token: org.ownerToken).status == .ok)
        }
    }

    @Test("an undeclared method on a known path is 405 with Allow; an unknown path stays 404")
    func methodNotAllowed() async throws {
        try await withOrganisation { org, client in
            let trace = try await client.send(.init("TRACE")!, "/v1/me", token: org.ownerToken)
            #expect(trace.isProblem(.methodNotAllowed))
            #expect(trace.headers[.allow] == "GET, HEAD, OPTIONS, PATCH")
            let put = try await client.send(.put, "/v1/events", token: org.ownerToken, json: "{}")
            #expect(put.isProblem(.methodNotAllowed))
            #expect(put.headers[.allow] == "GET, HEAD, OPTIONS, POST")
            // A fixed path beside a templated one answers with its own methods.
            let markRead = try await client.send(.get, "/v1/me/notifications/mark-read", token: org.memberToken)
            #expect(markRead.isProblem(.methodNotAllowed))
            #expect(markRead.headers[.allow] == "OPTIONS, POST")
            let unread = try await client.send(.post, "/v1/me/notifications/unread-count", token: org.memberToken)
            #expect(unread.headers[.allow] == "GET, HEAD, OPTIONS")
            #expect(try await client.send(.get, "/v1/nothing-here", token: org.ownerToken).isProblem(.notFound))
            // HEAD is the GET without its body (RFC 9110 §9.3.2), problems included; a path with no GET refuses it.
            let head = try await client.send(.head, "/v1/me", token: org.ownerToken)
            #expect(head.status == .ok && head.text.isEmpty, "\(head.text.prefix(200))")
            #expect(head.headers[.contentType]?.hasPrefix("application/json") == true)
            #expect(try await client.send(.head, "/healthz").status == .ok)
            let anonymous = try await client.send(.head, "/v1/me")
            #expect(anonymous.status == .unauthorized && anonymous.text.isEmpty)
            let noGet = try await client.send(.head, "/v1/me/notifications/mark-read", token: org.memberToken)
            #expect(noGet.status == .methodNotAllowed && noGet.headers[.allow] == "OPTIONS, POST")
        }
    }

    @Test("the route table the boundary uses is generated from the current openapi.yaml")
    func specRoutesAreCurrent() throws {
        let root = URL(fileURLWithPath: ProcessInfo.processInfo.environment["HERALD_SQL_DIR"] ?? "sql").deletingLastPathComponent()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", root.appendingPathComponent("scripts/spec-routes.py").path, "--stdout"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let generated = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let committed = try Data(contentsOf: root.appendingPathComponent("Sources/HeraldAPI/SpecRoutes.swift"))
        #expect(process.terminationStatus == 0)
        #expect(generated == committed, "Sources/HeraldAPI/SpecRoutes.swift is stale: run `make spec`")
    }
}

@Suite("Issue 8: what a CRM integrator needs")
struct IntegratorGapTests {
    @Test("events say who sent them; a user's manual send is audited, a key's is not")
    func sender() async throws {
        // setup
        try await withCatalogue { org, _, client in
            let key = try await org.serviceKey()
            let body =
                #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(org.memberID.uuidString.lowercased())"]}, "payload": {"title": "t"}}"#
            // act
            let byUser = try #require(
                try await client.send(.post, "/v1/events", token: org.ownerToken, json: body).json["event_id"] as? String)
            let byKey = try #require(try await client.send(.post, "/v1/events", token: key, json: body).json["event_id"] as? String)
            // check
            let one = try await client.send(.get, "/v1/events/\(byUser)", token: org.ownerToken).json
            #expect((one["sent_by"] as? [String: Any])?["type"] as? String == "user")
            #expect((one["sent_by"] as? [String: Any])?["id"] as? String == org.ownerID.uuidString.lowercased())
            let list = try #require(try await client.send(.get, "/v1/events", token: org.ownerToken).json["items"] as? [[String: Any]])
            #expect((list.first { $0["id"] as? String == byKey }?["sent_by"] as? [String: Any])?["type"] as? String == "api_key")
            let audit = try #require(
                try await client.send(.get, "/v1/audit-log?action=event.send_manual", token: org.ownerToken).json["items"]
                    as? [[String: Any]])
            #expect(audit.map { $0["target_id"] as? String } == [byUser])
            #expect(!(audit.first.map { "\($0)" } ?? "").contains("payload"))
        }
    }

    @Test("a throttle across all of a user's notifications; critical in-app alerts still pass")
    func userThrottle() async throws {
        // setup
        try await withCatalogue { org, _, client in
            let member = org.memberID.uuidString.lowercased()
            let set = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"user_throttle_per_minute": 2}"#)
            #expect(set.json["user_throttle_per_minute"] as? Int == 2)
            #expect(
                try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"user_throttle_per_minute": -1}"#)
                    .isProblem(.unprocessableContent))
            // act: two categories (alerts, then activity), so the second activity event is the
            // member's third notification of the minute but only the second of its category
            func send(_ type: String) async throws -> [String: Any] {
                try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json: #"{"type": "\#(type)", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "t"}}"#
                ).json
            }
            let alert = try await send("ISQ_CRITICAL")
            let first = try await send("TASK_ASSIGNED")
            let third = try await send("TASK_ASSIGNED")
            let critical = try await send("ISQ_CRITICAL")
            // check
            #expect((alert["counts"] as? [String: Any])?["in_app"] as? Int == 1)
            #expect((first["counts"] as? [String: Any])?["in_app"] as? Int == 1)
            #expect((third["counts"] as? [String: Any])?["in_app"] as? Int == 0)
            #expect((critical["counts"] as? [String: Any])?["in_app"] as? Int == 1)
            let id = try #require(third["event_id"] as? String)
            let explained = try await client.send(.get, "/v1/events/\(id)/explain", token: org.ownerToken).text
            #expect(explained.contains("THROTTLED"))
        }
    }

    @Test("a per-minute limit counts what was sent while a limit was set: one set now starts its count at zero (0053)")
    func limitCountsFromWhenSet() async throws {
        try await withCatalogue { org, _, client in
            let member = org.memberID.uuidString.lowercased()
            func send() async throws -> Int? {
                let answer = try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json: #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "t"}}"#)
                return (answer.json["counts"] as? [String: Any])?["in_app"] as? Int
            }
            // Two events with no limit set: their trace rows stay out of the limits' index.
            #expect(try await send() == 1)
            #expect(try await send() == 1)
            let uncounted = try await org.store { tx in
                try await tx.query(
                    "SELECT count(*)::int FROM event_recipients WHERE organisation_id = \(org.id) AND counted_by_limits = false AND notified"
                )[0].decode(Int.self)
            }
            #expect(uncounted == 2)
            // A limit of two a minute, per category and per user: the two before it do not count.
            let set = try await client.send(
                .patch, "/v1/organisation", token: org.ownerToken, json: #"{"throttle_per_minute": 2, "user_throttle_per_minute": 2}"#)
            #expect(set.status == .ok, "\(set.text)")
            #expect(try await send() == 1)
            #expect(try await send() == 1)
            #expect(try await send() == 0, "the third since the limit was set is throttled")
        }
    }

    @Test("events carry tags, feed items show them, and the feed filters by them (ANDed)")
    func tags() async throws {
        // setup
        try await withCatalogue { org, _, client in
            let member = org.memberID.uuidString.lowercased()
            func send(_ tags: String) async throws -> TestResponse {
                try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json:
                        #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "t"}, "tags": \#(tags)}"#
                )
            }
            #expect(try await send(#"["team:sales", "region:north"]"#).status == .accepted)
            #expect(try await send(#"["team:sales"]"#).status == .accepted)
            #expect(try await send(#"["team:support"]"#).status == .accepted)
            #expect(try await send(#"["Not A Tag"]"#).isProblem(.unprocessableContent))
            // act
            let sales = try #require(
                try await client.send(.get, "/v1/me/notifications?tag=team:sales", token: org.memberToken).json["items"] as? [[String: Any]]
            )
            let both = try #require(
                try await client.send(.get, "/v1/me/notifications?tag=team:sales&tag=region:north", token: org.memberToken)
                    .json["items"] as? [[String: Any]])
            let all = try #require(
                try await client.send(.get, "/v1/me/notifications", token: org.memberToken).json["items"] as? [[String: Any]])
            // check
            #expect(sales.count == 2)
            #expect(both.count == 1)
            #expect(both.first?["tags"] as? [String] == ["region:north", "team:sales"])
            #expect(all.count == 3)
            #expect(try await client.send(.get, "/v1/me/notifications?tag=bad", token: org.memberToken).isProblem(.unprocessableContent))
        }
    }

    @Test("the service role's key can ask why a user was or was not told")
    func serviceMayExplain() async throws {
        try await withCatalogue { org, _, client in
            let key = try await org.serviceKey()
            let sent = try await client.send(
                .post, "/v1/events", token: key,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "t"}}"#)
            let id = try #require(sent.json["event_id"] as? String)
            #expect(try await client.send(.get, "/v1/events/\(id)/explain", token: key).status == .ok)
            #expect(try await client.send(.get, "/v1/notifications/debug?event=TASK_ASSIGNED", token: key).status == .ok)
        }
    }
}

extension TestOrganisation {
    /// A new API key of the built-in service role (an integrator's backend), made by the owner.
    func serviceKey() async throws -> String {
        try await apiKey(role: try await store { tx in try await tx.builtinRole(.service).id })
    }

    /// The secret of an API key whose role has exactly `permissions` (a role made for it).
    func apiKey(permissions: [Permission]) async throws -> String {
        try await apiKey(
            role: try await store { tx in
                try await tx.createRole(
                    key: "key-\(UUID().uuidString.prefix(6).lowercased())", name: "Key", description: "", permissions: Set(permissions)
                ).id
            })
    }

    private func apiKey(role: UUID) async throws -> String {
        let env = try await TestEnvironment.shared
        let service = role.uuidString.lowercased()
        let app = try env.application()
        return try await app.test(.router) { client in
            let created = try await client.send(
                .post, "/v1/api-keys", token: ownerToken, json: #"{"name": "CRM", "role_id": "\#(service)"}"#)
            return try #require(created.json["secret"] as? String)
        }
    }
}

@Suite("Issue 8: an organisation set up from a file")
struct CatalogueDocumentTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test("a key without organisation.manage exports the catalogue without the preference defaults, and can apply it again")
    func exportWithoutDefaults() async throws {
        try await withCatalogue { org, _, client in
            let key = try await org.serviceKey()
            #expect(
                try await client.send(
                    .put, "/v1/organisation/preference-defaults", token: org.ownerToken,
                    json: #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "DAILY"}]}"#
                ).status == .ok)
            // The dedicated route refuses the key; the document does not show them either.
            #expect(try await client.send(.get, "/v1/organisation/preference-defaults", token: key).isProblem(.forbidden))
            let exported = try await client.send(.get, "/v1/catalogue", token: key)
            #expect(exported.status == .ok, "\(exported.text.prefix(300))")
            #expect(exported.json["preference_defaults"] == nil && (exported.json["types"] as? [Any])?.isEmpty == false)
            let applied = try await client.send(.put, "/v1/catalogue", token: key, json: exported.text)
            #expect(applied.status == .ok, "\(applied.text.prefix(300))")
            // The owner still sees them, unchanged.
            let owner = try await client.send(.get, "/v1/catalogue", token: org.ownerToken)
            #expect((owner.json["preference_defaults"] as? [Any])?.count == 1, "\(owner.text.prefix(300))")
        }
    }

    @Test("export, import into an empty organisation, import again: the same catalogue, one audit entry, events work")
    func exportImport() async throws {
        // setup: A has the test catalogue and a preference default, B is empty
        let a = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: a)
        let b = try await TestOrganisation.make()
        let app = try env.application()
        try await app.test(.router) { client in
            #expect(
                try await client.send(
                    .put, "/v1/organisation/preference-defaults", token: a.ownerToken,
                    json: #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "DAILY"}]}"#
                ).status == .ok)
            #expect(
                try await client.send(
                    .put, "/v1/digest-templates/fr", token: a.ownerToken,
                    json: #"{"subject": "{{{organisation.name}}} : résumé", "body": "Bonjour {{{recipient.display_name}}}"}"#
                ).status == .ok)
            let exported = try await client.send(.get, "/v1/catalogue", token: a.ownerToken)
            #expect(exported.status == .ok)
            #expect(exported.text.contains("ISQ_CRITICAL") && exported.text.contains("Critical ISQ {{payload.isq}}"))
            #expect(exported.text.contains("Bonjour {{{recipient.display_name}}}"), "\(exported.text)")
            // act
            let first = try await client.send(.put, "/v1/catalogue", token: b.ownerToken, json: exported.text)
            let second = try await client.send(.put, "/v1/catalogue", token: b.ownerToken, json: exported.text)
            // check: B now has exactly A's catalogue, the second import changed nothing
            #expect(first.status == .ok)
            #expect(first.text == exported.text)
            #expect(second.text == exported.text)
            #expect(try await client.send(.get, "/v1/catalogue", token: b.ownerToken).text == exported.text)
            let audit = try #require(
                try await client.send(.get, "/v1/audit-log?action=catalogue.import", token: b.ownerToken).json["items"] as? [Any])
            #expect(audit.count == 1)
            let sent = try await client.send(
                .post, "/v1/events", token: b.ownerToken,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "first"}}"#)
            #expect(sent.status == .accepted)
            #expect(try await client.send(.get, "/v1/catalogue", token: b.memberToken).isProblem(.forbidden))
        }
    }

    @Test("digest templates in the document: absent leaves them, present replaces them, a bad one refuses the document")
    func digestTemplatesInDocument() async throws {
        try await withOrganisation { org, client in
            func put(_ document: String) async throws -> TestResponse {
                try await client.send(.put, "/v1/catalogue", token: org.ownerToken, json: document)
            }
            func locales() async throws -> [String] {
                let listed = try await client.send(.get, "/v1/digest-templates", token: org.ownerToken)
                return (listed.json["items"] as? [[String: Any]] ?? []).compactMap { $0["locale"] as? String }
            }
            let two = #"""
                {"categories": [], "types": [], "digest_templates": [
                  {"locale": "fr", "subject": "Résumé", "body": "Bonjour"},
                  {"locale": "de", "subject": "Zusammenfassung", "body": "Hallo", "html": "<p>Hallo</p>"}]}
                """#
            #expect(try await put(two).status == .ok)
            #expect(try await locales() == ["de", "fr"])
            // Absent: left as they are.
            #expect(try await put(#"{"categories": [], "types": []}"#).status == .ok)
            #expect(try await locales() == ["de", "fr"])
            // Present: replaced; fr is gone, de changed.
            let one = #"{"categories": [], "types": [], "digest_templates": [{"locale": "de", "subject": "Neu", "body": "Hallo"}]}"#
            #expect(try await put(one).status == .ok)
            #expect(try await locales() == ["de"])
            let de = try await client.send(.get, "/v1/digest-templates/de", token: org.ownerToken)
            #expect(de.json["subject"] as? String == "Neu" && de.json["html"] == nil, "\(de.text)")
            // A blank, broken or doubled template refuses the whole document, naming it; nothing changes.
            for (document, field) in [
                (
                    #"{"categories": [], "types": [], "digest_templates": [{"locale": "fr", "subject": " ", "body": "x"}]}"#,
                    "digest_templates[0].subject"
                ),
                (
                    #"{"categories": [], "types": [], "digest_templates": [{"locale": "fr", "subject": "s", "body": "{{#open}}"}]}"#,
                    "digest_templates[0].body"
                ),
                (
                    #"{"categories": [], "types": [], "digest_templates": [{"locale": "fr", "subject": "s", "body": "b"}, {"locale": "FR", "subject": "s", "body": "b"}]}"#,
                    "digest_templates[1].locale"
                ),
                (#"{"categories": [], "types": [], "digest_templates": []}"#, nil),
            ] {
                let answer = try await put(document)
                if let field {
                    #expect(
                        answer.isProblem(.unprocessableContent) && (answer.json["detail"] as? String ?? "").hasPrefix(field),
                        "\(answer.text)")
                    #expect(try await locales() == ["de"])
                } else {
                    // An empty list deletes them all.
                    #expect(answer.status == .ok && (answer.json["digest_templates"] as? [Any])?.isEmpty == true, "\(answer.text)")
                    #expect(try await locales() == [])
                }
            }
        }
    }

    @Test("an invalid part refuses the whole document (422 naming it) and nothing is written")
    func invalidDocumentWritesNothing() async throws {
        try await withOrganisation { org, client in
            let document = #"""
                {"categories": [{"key": "news", "name": "News"}],
                 "types": [{"key": "NEWS", "category": "news", "name": "News", "templates": [{"channel": "in_app", "locale": "en", "subject": "ok", "body": "ok"}]},
                           {"key": "BROKEN", "category": "news", "name": "Broken", "templates": [{"channel": "email", "locale": "en", "subject": "s", "body": "{{#open}} never closed"}]}]}
                """#
            let refused = try await client.send(.put, "/v1/catalogue", token: org.ownerToken, json: document)
            #expect(refused.isProblem(.unprocessableContent))
            #expect((refused.json["detail"] as? String)?.hasPrefix("types[1].templates[0].body") == true)
            let after = try await client.send(.get, "/v1/catalogue", token: org.ownerToken).json
            #expect((after["categories"] as? [Any])?.isEmpty == true)
            #expect((after["types"] as? [Any])?.isEmpty == true)
            let unknownCategory = #"{"categories": [], "types": [{"key": "X1", "category": "nowhere", "name": "X"}]}"#
            let missing = try await client.send(.put, "/v1/catalogue", token: org.ownerToken, json: unknownCategory)
            #expect(missing.isProblem(.unprocessableContent))
            #expect((missing.json["detail"] as? String)?.hasPrefix("types[0].category") == true)
        }
    }

    @Test("herald organisation create --catalogue demo: a new organisation that can send at once")
    func organisationWithDemoCatalogue() async throws {
        // setup
        let slug = "cli-\(UUID().uuidString.prefix(8).lowercased())"
        let process = Process()
        let environment = ProcessInfo.processInfo.environment
        process.executableURL = URL(fileURLWithPath: environment["HERALD_TEST_BINARY"] ?? ".build/debug/herald")
        process.arguments = [
            "organisation", "create", "--slug", slug, "--name", "CLI Clinic", "--owner-email", "owner@\(slug).example",
            "--catalogue", "demo",
        ]
        process.environment = environment.merging([
            "DATABASE_URL": env.appURL, "HERALD_OWNER_PASSWORD": "a long enough passphrase", "HERALD_ARGON2_ITERATIONS": "1",
        ]) { _, new in new }
        let output = Pipe()
        process.standardOutput = output
        // act
        try process.run()
        let printed = try await offPool { [process] in
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return String(decoding: data, as: UTF8.self)
        }
        // check
        #expect(process.terminationStatus == 0, "\(printed)")
        #expect(printed.contains("demo catalogue"))
        let id = try #require(try await env.database.organisationID(slug: slug))
        let types = try await env.database.withTenant(id) { tx in try await tx.notificationTypes().map(\.key) }
        #expect(types.contains("ISQ_CRITICAL") && types.contains("TASK_ASSIGNED"))
        // Audited under the organisation's id as every id is written (lowercase), so the audit
        // filter by target_id finds it.
        let audited = try await env.database.withTenant(id) { tx in
            try await tx.query(
                "SELECT target_id, request_id FROM audit_log WHERE organisation_id = \(id) AND action = 'organisation.create'"
            ).map { try $0.decode((String, String).self) }
        }
        #expect(audited.map(\.0) == [id.lowercased], "\(audited)")
        // The operator is named: the command, who ran it, where.
        #expect(audited.first?.1.hasPrefix("cli herald organisation create by ") == true, "\(audited)")
        // The same slug again: refused in words, nothing written.
        let again = try await runHeraldExit(
            ["organisation", "create", "--slug", slug, "--name", "Again", "--owner-email", "again@\(slug).example"],
            ["DATABASE_URL": env.appURL, "HERALD_OWNER_PASSWORD": "a long enough passphrase", "HERALD_ARGON2_ITERATIONS": "1"])
        #expect(again.status != 0 && again.output.contains("already exists: choose another --slug"), "\(again.output)")
        // A blank name is refused before anything is written.
        let blank = try await runHeraldExit(
            ["organisation", "create", "--slug", slug + "-b", "--name", "   ", "--owner-email", "b@\(slug).example"],
            ["DATABASE_URL": env.appURL, "HERALD_OWNER_PASSWORD": "a long enough passphrase", "HERALD_ARGON2_ITERATIONS": "1"])
        #expect(blank.status != 0 && blank.output.contains("name: must not be blank"), "\(blank.output)")
        #expect(try await env.database.organisationID(slug: slug + "-b") == nil)
    }

    @Test("serve as the schema's owner and a worker that may not claim stop at once, saying which role to use (operator trial)")
    func wrongDatabaseRolesStop() async throws {
        let env = try await TestEnvironment.shared
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("roles-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let keys = root.appendingPathComponent("jwt").path
        _ = try await runHerald(["jwt-keygen", "--dir", keys], [:])
        let owner = try await runHeraldExit(
            ["serve"],
            [
                "DATABASE_URL": env.ownerURL, "HERALD_JWT_KEYS_DIR": keys, "HERALD_WORKERS": "0",
                "HERALD_PORT": "\(Int.random(in: 20_000..<30_000))",
            ], timeout: 30)
        #expect(
            owner.status == 1 && owner.output.contains("DATABASE_URL connects as herald_owner, which owns the schema"), "\(owner.output)")
        let worker = try await runHeraldExit(
            ["worker"], ["DATABASE_WORKER_URL": env.appURL, "HERALD_WORKER_METRICS_PORT": "0"], timeout: 30)
        #expect(
            worker.status == 1 && worker.output.contains("DATABASE_WORKER_URL connects as herald_app, which is not herald_worker"),
            "\(worker.output)")
    }

    @Test("serve on a port in use names the failure before it shuts down, and ends with it as a JSON line (an SRE trial)")
    func portInUseReported() async throws {
        let env = try await TestEnvironment.shared
        let keys = try StreamServeProcess.keysDirectory()
        defer { try? FileManager.default.removeItem(atPath: keys) }
        // A port held by a listener of this test.
        let held = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(held) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(held, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(bound == 0 && listen(held, 1) == 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(held, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: address.sin_port))
        let run = try await runHeraldExit(
            ["serve"],
            [
                "DATABASE_URL": env.appURL, "HERALD_JWT_KEYS_DIR": keys, "HERALD_WORKERS": "0", "HERALD_HOST": "127.0.0.1",
                "HERALD_PORT": "\(port)", "HERALD_LOG_FORMAT": "json", "HERALD_FANOUT_RUNNERS": "0",
            ], timeout: 60)
        #expect(run.status == 1, "\(run.output)")
        let lines = run.output.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
        }
        // Every line is JSON, the last one too.
        #expect(lines.count == run.output.split(separator: "\n").count, "\(run.output)")
        let messages = lines.compactMap { $0["message"] as? String }
        let failed = try #require(messages.firstIndex { $0 == "Application failed: shutting down" }, "\(run.output)")
        let shutting = try #require(messages.firstIndex { $0.hasPrefix("shutting down") }, "\(run.output)")
        #expect(failed < shutting)
        #expect(messages.last == "herald stopped")
        #expect((lines.last?["error"] as? String)?.contains("Address already in use") == true, "\(run.output)")
    }

    @Test("jwt-keygen refuses a key id that is a path (../x wrote outside --dir), and writes the key it is given inside --dir")
    func keygenKeyIDs() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("keygen-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let keys = root.appendingPathComponent("jwt").path
        for kid in ["../evil", "a/b", ".hidden", "", String(repeating: "k", count: 65)] {
            let refused = try await runHeraldExit(["jwt-keygen", "--dir", keys, "--kid", kid], [:])
            #expect(refused.status != 0 && refused.output.contains("a key id is 1 to 64 letters"), "\(kid): \(refused.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: root.appendingPathComponent("evil.pem").path))
        let made = try await runHerald(["jwt-keygen", "--dir", keys, "--kid", "2026-12-06.k_1"], [:])
        #expect(made.contains("2026-12-06.k_1.pem"), "\(made)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: keys) == ["2026-12-06.k_1.pem"])
    }

    @Test("a command whose database refuses its URL says so at once, in PostgreSQL's words, naming the setting")
    func commandDatabaseErrors() async throws {
        let env = try await TestEnvironment.shared
        // Percent escapes are decoded once: a password with a % in it reaches PostgreSQL as written.
        let escaped = try DatabaseURL("postgres://herald%20owner:p%25ss%2541@db.example:6432/herald?sslmode=require")
        #expect(escaped.username == "herald owner" && escaped.password == "p%ss%41" && escaped.port == 6432 && escaped.tls == "require")
        let owner = try #require(URLComponents(string: env.ownerURL))
        func migrate(_ url: String) async throws -> (status: Int32, output: String) {
            try await runHeraldExit(["migrate"], ["DATABASE_OWNER_URL": url])
        }
        var wrongPassword = owner
        wrongPassword.password = "not-the-password"
        let refused = try await migrate(try #require(wrongPassword.string))
        #expect(
            refused.status != 0 && refused.output.contains("DATABASE_OWNER_URL")
                && refused.output.contains("password authentication failed"),
            "\(refused.output)")
        var noDatabase = owner
        noDatabase.path = "/herald_no_such_database"
        let missing = try await migrate(try #require(noDatabase.string))
        #expect(missing.status != 0 && missing.output.contains("does not exist"), "\(missing.output)")
        var closed = owner
        closed.port = 1
        let unreachable = try await migrate(try #require(closed.string))
        #expect(unreachable.status != 0 && unreachable.output.contains("Cannot connect to PostgreSQL at"), "\(unreachable.output)")
        let notURL = try await migrate("not a url")
        #expect(notURL.status != 0 && notURL.output.contains("DATABASE_OWNER_URL="), "\(notURL.output)")
        // The application role is not the schema's owner: PostgreSQL's refusal, in its words.
        let asApp = try await migrate(env.appURL)
        #expect(asApp.status != 0 && asApp.output.contains("permission denied"), "\(asApp.output)")
    }
}

extension BoundaryDefectTests {
    @Test("a JSON log line: UTC time with its Z, statuses, pids and durations as numbers, one request id")
    func jsonLogLine() throws {
        let handler = JSONLogHandler(label: "herald", level: .info)
        let event = LogEvent(
            level: .info, message: "request",
            metadata: [
                "status": "200", "duration_ms": "18.38", "backend_pid": "17801", "request_id": "abc", "hb.request.id": "abc",
                "route": "/v1/me", "shutdown_seconds": "20",
            ], source: nil, file: #fileID, function: #function, line: #line)
        let data = try #require(handler.line(event, at: Date(timeIntervalSince1970: 1_796_000_000.5)))
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(object["time"] as? String == "2026-11-30T00:53:20.500Z", "\(object)")
        #expect(object["status"] as? Int == 200 && object["backend_pid"] as? Int == 17801 && object["shutdown_seconds"] as? Int == 20)
        #expect(object["duration_ms"] as? Double == 18.38)
        #expect(object["route"] as? String == "/v1/me" && object["request_id"] as? String == "abc")
        #expect(object["hb.request.id"] == nil)
    }
}
