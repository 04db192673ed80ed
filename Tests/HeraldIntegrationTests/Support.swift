import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import JWTKit
import Logging
import NIOCore
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldStore

#if canImport(Glibc)
    import Glibc
#endif

/// The real PostgreSQL that `make test` starts, reached as the application role (what the
/// server uses) and as the owner (what migrations use). Shared by every test in the process;
/// tests stay independent because each makes its own organisations.
final class TestEnvironment: Sendable {
    /// The one environment of this test process, made on first use.
    static var shared: TestEnvironment {
        get async throws { try await Cache.instance.environment() }
    }

    /// One task makes the environment; every caller awaits that same task. (Checking a stored
    /// value across an `await` would let two concurrent first callers each make one, with
    /// different signing keys: tokens of one would fail in the other.)
    private actor Cache {
        static let instance = Cache()
        private var making: Task<TestEnvironment, any Error>?

        func environment() async throws -> TestEnvironment {
            if let making { return try await making.value }
            let task = Task { try await TestEnvironment() }
            making = task
            return try await task.value
        }
    }

    let appURL: String
    let ownerURL: String
    let workerURL: String
    let appClient: PostgresClient
    let database: Database
    /// The delivery workers' role: the only one that may claim across organisations.
    let workerClient: PostgresClient
    let workerDatabase: Database
    let signingKey: ES256PrivateKey
    let tokens: AccessTokens
    let passwords = PasswordHasher(iterations: 1, memoryKiB: 1024, parallelism: 1)
    let logger: Logger

    private init() async throws {
        let env = ProcessInfo.processInfo.environment
        // No silent skip: without a database this suite must fail, loudly.
        guard let app = env["HERALD_TEST_DATABASE_URL"], let owner = env["HERALD_TEST_OWNER_URL"],
            let worker = env["HERALD_TEST_WORKER_URL"]
        else {
            throw MissingDatabase()
        }
        appURL = app
        ownerURL = owner
        workerURL = worker
        var logger = Logger(label: "herald.test")
        logger.logLevel = env["HERALD_TEST_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .error
        self.logger = logger
        appClient = PostgresClient(configuration: try .fromURL(app), backgroundLogger: logger)
        let client = appClient
        Task.detached { await client.run() }
        database = Database(client: appClient, logger: logger)
        // Every delivery test runs its own worker pools (one LISTEN connection each, plus sends,
        // heartbeats and claims), several suites at once: a starved pool delays heartbeats.
        var workerConfiguration = try PostgresClient.Configuration.fromURL(worker)
        workerConfiguration.options.maximumConnections = 100
        workerClient = PostgresClient(configuration: workerConfiguration, backgroundLogger: logger)
        let workers = workerClient
        Task.detached { await workers.run() }
        workerDatabase = Database(client: workerClient, logger: logger)
        signingKey = ES256PrivateKey()
        let key = signingKey
        tokens = try await AccessTokens(
            keys: [AccessTokenKey(id: "test-key", privateKey: key)], activeKeyID: nil,
            issuer: "herald", audience: "herald-api", ttl: 900, leeway: 30)
    }

    /// The link keys the test applications verify and the test workers sign with.
    static let linkKeys = LinkKeyRing.ephemeral()
    /// A HERALD_LINK_KEYS value for the commands the tests run (`digests send`, the inactivity rule).
    static let linkKeysSetting = "k1:" + Data((0..<32).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()

    /// The migration versions this build ships (sql/migrations, a package resource).
    static var migrationVersions: [Int] {
        (try? Migration.shipped().map(\.version)) ?? []
    }

    func configuration(_ change: (inout AppConfiguration) -> Void = { _ in }) -> AppConfiguration {
        var config = AppConfiguration()
        config.maxBodyBytes = 64 * 1024
        // The pools are the environment's; the URL is what readiness tries on its own.
        config.databaseURL = appURL
        change(&config)
        return config
    }

    /// An application wired to the shared database, ready for `app.test(.router)`.
    func application(
        now: @escaping @Sendable () -> Date = { Date() },
        expectedMigrations: [Int] = TestEnvironment.migrationVersions,
        logger: Logger? = nil,
        database: Database? = nil,
        gate: OrganisationGate? = nil,
        configure: (inout AppConfiguration) -> Void = { _ in }
    ) throws -> some ApplicationProtocol {
        let dependencies = AppDependencies(
            database: database ?? self.database, postgres: appClient, tokens: tokens, passwords: passwords,
            expectedMigrations: expectedMigrations, linkKeys: TestEnvironment.linkKeys, gate: gate, now: now)
        let router = try buildRouter(configuration: configuration(configure), dependencies: dependencies)
        return Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: logger ?? self.logger)
    }
}

extension TestEnvironment {
    /// An application on `clock` whose organisations may send `events` and make `requests` a
    /// second (0: no limit; nil: the default), with a burst of one second: a clock that stands
    /// still refills nothing between requests.
    func rateLimited(events: Double? = nil, requests: Double, clock: TestClock) throws -> some ApplicationProtocol {
        try application(
            now: { clock.now() },
            configure: {
                if let events { $0.rateLimitEvents = events }
                $0.rateLimitBurstSeconds = 1
                $0.rateLimitRequests = requests
            })
    }
}

/// The suite runs against a real database or not at all.
struct MissingDatabase: Error, CustomStringConvertible {
    var description: String {
        "HERALD_TEST_DATABASE_URL, HERALD_TEST_OWNER_URL and HERALD_TEST_WORKER_URL are not set: run the suite with `make test`."
    }
}

/// An organisation made for one test: an owner and a member, each with a live access token.
struct TestOrganisation: Sendable {
    var id: UUID
    var slug: String
    var ownerID: UUID
    var ownerToken: String
    var memberID: UUID
    var memberToken: String
    static let password = "correct horse battery staple"

    static func make() async throws -> TestOrganisation {
        let env = try await TestEnvironment.shared
        let slug = "org-\(UUID().uuidString.prefix(8).lowercased())"
        let organisation = try await env.database.createOrganisation(slug: slug, name: "Test \(slug)")
        let hash = try await env.passwords.hash(password)
        let (owner, member) = try await env.database.withTenant(organisation.id) { tx in
            let owner = try await tx.createUser(NewUser(email: "owner@\(slug).example", displayName: "Owner", passwordHash: hash))
            _ = try await tx.setUserRoles(owner.id, [try await tx.builtinRole(.owner).id])
            let member = try await tx.createUser(NewUser(email: "member@\(slug).example", displayName: "Member", passwordHash: hash))
            _ = try await tx.setUserRoles(member.id, [try await tx.builtinRole(.member).id])
            return (owner.id, member.id)
        }
        return TestOrganisation(
            id: organisation.id, slug: slug, ownerID: owner,
            ownerToken: try await env.tokens.issueAccessToken(organisationID: organisation.id, userID: owner, now: Date()),
            memberID: member,
            memberToken: try await env.tokens.issueAccessToken(organisationID: organisation.id, userID: member, now: Date()))
    }

    /// Runs store calls inside this organisation, as the system actor.
    func store<T: Sendable>(_ body: (TenantTransaction) async throws -> T) async throws -> T {
        try await TestEnvironment.shared.database.withTenant(id, body)
    }
}

/// A JSON object decoded from a response, for checks that do not need the generated types.
typealias JSONObject = [String: any Sendable]

extension TestClientProtocol {
    /// Sends a request with an optional bearer token and JSON body.
    @discardableResult
    func send(
        _ method: HTTPRequest.Method, _ path: String, token: String? = nil, json: String? = nil,
        headers extra: HTTPFields = [:]
    ) async throws -> TestResponse {
        var headers = extra
        if let token { headers[.authorization] = "Bearer \(token)" }
        if json != nil { headers[.contentType] = "application/json" }
        return try await execute(uri: path, method: method, headers: headers, body: json.map { ByteBuffer(string: $0) })
    }
}

extension TestResponse {
    var text: String { String(buffer: body) }

    /// The body as a JSON object (empty when it is not one).
    var json: [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
    }

    /// The body decoded into one of openapi.yaml's generated schema types (`Components.Schemas`),
    /// with the server's date format. Objects the spec closes (`additionalProperties: false`)
    /// refuse a key the spec does not declare, so a check written this way also checks the shape.
    func decoded<T: Decodable>(_ type: T.Type = T.self) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .custom { decoder in
            try FlexibleISO8601().decode(try decoder.singleValueContainer().decode(String.self))
        }
        return try decoder.decode(T.self, from: Data(text.utf8))
    }

    /// True for an RFC 9457 problem with this status.
    func isProblem(_ status: HTTPResponse.Status) -> Bool {
        self.status == status && headers[.contentType] == "application/problem+json" && (json["status"] as? Int) == status.code
            && json["type"] is String && json["title"] is String && json["detail"] is String
    }
}

/// The operations of openapi.yaml, read through PyYAML (installed by scripts/install-deps.sh).
struct SpecOperation: Sendable {
    var id: String
    var method: String
    var path: String
    var permission: String
    var exampleBody: String?
}

enum Spec {
    static func operations() throws -> [SpecOperation] {
        let specPath = URL(fileURLWithPath: ProcessInfo.processInfo.environment["HERALD_SQL_DIR"] ?? "sql")
            .deletingLastPathComponent().appendingPathComponent("openapi.yaml").path
        let script = """
            import json, sys, yaml
            spec = yaml.safe_load(open(sys.argv[1]))
            out = []
            for path, item in spec["paths"].items():
                for method, op in item.items():
                    if method == "parameters": continue
                    body = None
                    content = (op.get("requestBody") or {}).get("content", {}).get("application/json")
                    if content and content.get("examples"):
                        body = json.dumps(next(iter(content["examples"].values()))["value"])
                    out.append({"id": op["operationId"], "method": method.upper(), "path": path,
                                "permission": op.get("x-permission", ""), "body": body})
            print(json.dumps(out))
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script, specPath]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0,
            let list = try JSONSerialization.jsonObject(with: data) as? [[String: Any]]
        else {
            throw SpecError.unreadable(specPath)
        }
        return list.map {
            SpecOperation(
                id: $0["id"] as! String, method: $0["method"] as! String, path: $0["path"] as! String,
                permission: $0["permission"] as! String, exampleBody: $0["body"] as? String)
        }
    }

    enum SpecError: Error { case unreadable(String) }
}

/// The medical-alert catalogue of the brief, made in a test organisation: categories `alerts`
/// (critical), `activity` and `outings`; types `ISQ_CRITICAL` (in-app + email) and
/// `TASK_ASSIGNED` (in-app); a `clinician` role held by the owner and the member.
struct TestCatalogue: Sendable {
    var alerts: UUID
    var activity: UUID
    var outings: UUID
    var isqCritical: UUID
    var taskAssigned: UUID
    var clinicianRole: UUID

    static func make(in org: TestOrganisation) async throws -> TestCatalogue {
        try await org.store { tx in
            let alerts = try await tx.createCategory(key: "alerts", name: "Alerts", description: "Clinical alerts", critical: true)
            let activity = try await tx.createCategory(key: "activity", name: "Activity", description: "", critical: false)
            let outings = try await tx.createCategory(key: "outings", name: "Outings", description: "", critical: false)
            let isq = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "ISQ_CRITICAL", categoryID: alerts.id, name: "Critical ISQ reading", description: "",
                    defaultSeverity: .critical, defaultPriority: .critical, defaultChannels: [.inApp, .email]))
            try await tx.putTemplate(
                typeID: isq.id, channel: .inApp, locale: "en",
                content: TemplateContent(
                    subject: "Critical ISQ {{payload.isq}}",
                    body: "Implant {{payload.implant}}: stability {{payload.isq}} is below {{payload.threshold}}."))
            try await tx.putTemplate(
                typeID: isq.id, channel: .inApp, locale: "fr",
                content: TemplateContent(
                    subject: "ISQ critique {{payload.isq}}",
                    body: "Implant {{payload.implant}} : stabilité {{payload.isq}} sous {{payload.threshold}}."))
            let task = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "TASK_ASSIGNED", categoryID: activity.id, name: "Task assigned", description: "",
                    defaultSeverity: .info, defaultPriority: .normal, defaultChannels: [.inApp]))
            try await tx.putTemplate(
                typeID: task.id, channel: .inApp, locale: "en",
                content: TemplateContent(
                    subject: "{{payload.title}}", body: "Assigned to {{recipient.display_name}}"))
            let clinician = try await tx.createRole(key: "clinician", name: "Clinician", description: "", permissions: [.notificationsRead])
            for user in [org.ownerID, org.memberID] {
                let current = try await tx.user(user).roles.map(\.id)
                _ = try await tx.setUserRoles(user, current + [clinician.id])
            }
            return TestCatalogue(
                alerts: alerts.id, activity: activity.id, outings: outings.id, isqCritical: isq.id,
                taskAssigned: task.id, clinicianRole: clinician.id)
        }
    }
}

extension TestOrganisation {
    /// A TASK_ASSIGNED notify (`TestCatalogue`'s type) to `users`, titled `title`.
    func assignTask(to users: [UUID], title: String) async throws {
        try await notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: users), payload: .object(["title": .string(title)])))
    }

    /// Runs notify through the store, as the system: what `POST /v1/events` does after validation.
    @discardableResult
    func notify(_ request: EventRequest) async throws -> (event: EventRecord, plan: Plan) {
        try await store { tx in
            let planned = try await tx.planEvent(request, eventID: UUID(), now: Date())
            try await tx.write(planned.event, type: planned.type, plan: planned.plan)
            return (try await tx.event(planned.event.id), planned.plan)
        }
    }
}

/// Every line a logger wrote, with its metadata, for tests that read the logs.
final class CapturedLog: Sendable {
    private let lines = Mutex<[String]>([])

    var text: String { lines.withLock { $0.joined(separator: "\n") } }

    /// A logger that writes here (and nowhere else) at `level` and above.
    func logger(level: Logger.Level = .trace) -> Logger {
        var logger = Logger(label: "herald.captured") { _ in Handler(log: self) }
        logger.logLevel = level
        return logger
    }

    fileprivate func append(_ line: String) { lines.withLock { $0.append(line) } }

    private struct Handler: LogHandler {
        let log: CapturedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(
            level: Logger.Level, message: Logger.Message, metadata extra: Logger.Metadata?, source: String, file: String, function: String,
            line: UInt
        ) {
            let all = self.metadata.merging(extra ?? [:]) { _, new in new }
            log.append("\(level) \(message) \(all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
        }
    }
}

/// Runs the `herald` binary of this build (`HERALD_TEST_BINARY`) from the temporary directory
/// with `environment` over the test's own, and returns what it printed; a non-zero exit fails.
func runHerald(_ arguments: [String], _ environment: [String: String]) async throws -> String {
    let (status, text) = try await runHeraldExit(arguments, environment)
    try #require(status == 0, "herald \(arguments.joined(separator: " ")): \(text)")
    return text
}

/// `runHerald` that returns the exit status with the output, for commands expected to fail;
/// `timeout`: a command still running then is stopped (SIGKILL), so one that should have
/// stopped by itself fails its test instead of hanging it.
func runHeraldExit(
    _ arguments: [String], _ environment: [String: String], timeout: TimeInterval? = nil
) async throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: ProcessInfo.processInfo.environment["HERALD_TEST_BINARY"] ?? ".build/debug/herald")
    process.arguments = arguments
    process.currentDirectoryURL = FileManager.default.temporaryDirectory
    var inherited = ProcessInfo.processInfo.environment
    inherited["HERALD_SQL_DIR"] = nil
    process.environment = inherited.merging(environment) { _, new in new }
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    if let timeout {
        Thread.detachNewThread {
            Thread.sleep(forTimeInterval: timeout)
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
    }
    let data = try await offPool {
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return data
    }
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Runs `work`, a blocking wait (for a process, or a pipe until it closes), on a thread of its
/// own. On one of Swift's cooperative threads (two on this machine) a CLI run or a graceful
/// shutdown blocked it for seconds; two at once stalled every in-process server of the test run
/// (a WebSocket refusal that never came within 30 s, reads seconds late).
func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Result { try work() }) }
    }
}

/// An injected clock that stands still unless a test moves it.
final class TestClock: Sendable {
    let value: Mutex<Date>

    init(_ start: Date = Date()) { value = Mutex(start) }

    func now() -> Date { value.withLock { $0 } }
    func advance(_ seconds: TimeInterval) { value.withLock { $0 = $0.addingTimeInterval(seconds) } }
}

extension TestEnvironment {
    /// Runs `body` against a database of its own, migrated by the herald binary and dropped
    /// afterwards, through the application's and the worker's roles; `ownerURL` reaches it as
    /// the owner. For tests whose subject is database-wide: claims across every organisation,
    /// or plans under statistics that must see exactly the test's rows.
    func withScratchDatabase(
        _ prefix: String, _ body: (_ app: Database, _ worker: Database, _ ownerURL: String) async throws -> Void
    ) async throws {
        let name = "\(prefix)_\(UUID().uuidString.prefix(8).lowercased())"
        try await CitusReadinessTests.withClient(ownerURL, logger) {
            _ = try await $0.query("CREATE DATABASE \(unescaped: name)", logger: logger)
        }
        do {
            let owner = CitusReadinessTests.url(ownerURL, database: name)
            _ = try await runHerald(["migrate"], ["DATABASE_OWNER_URL": owner])
            try await CitusReadinessTests.withClient(CitusReadinessTests.url(appURL, database: name), logger) { app in
                try await CitusReadinessTests.withClient(CitusReadinessTests.url(workerURL, database: name), logger) { worker in
                    try await body(Database(client: app, logger: logger), Database(client: worker, logger: logger), owner)
                }
            }
        } catch {
            try? await CitusReadinessTests.withClient(ownerURL, logger) {
                _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: logger)
            }
            throw error
        }
        try? await CitusReadinessTests.withClient(ownerURL, logger) {
            _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: logger)
        }
    }
}

extension Database {
    /// A new organisation with one email type, `users` users and `events` events to all of them:
    /// `users × events` email deliveries due now.
    func emailOutbox(_ slug: String, users: Int, events: Int) async throws -> UUID {
        let id = try await createOrganisation(slug: slug, name: "Outbox \(slug)").id
        try await withTenant(id) { tx in
            let category = try await tx.createCategory(key: "news", name: "News", description: "", critical: false)
            _ = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "NEWS", categoryID: category.id, name: "News", description: "", defaultSeverity: .info, defaultPriority: .normal,
                    defaultChannels: [.email]))
            let readers = try await tx.query(
                """
                INSERT INTO users (organisation_id, email, display_name)
                SELECT \(id), 'reader' || g || '@' || \(slug) || '.example', 'Reader ' || g FROM generate_series(1, \(users)) g
                RETURNING id
                """
            ).map { try $0.decode(UUID.self) }
            for _ in 0..<events {
                let planned = try await tx.planEvent(
                    EventRequest(typeKey: "NEWS", audience: Audience(userIDs: readers), payload: .object([:])), eventID: UUID(), now: Date()
                )
                try await tx.write(planned.event, type: planned.type, plan: planned.plan)
            }
        }
        return id
    }
}

/// Sends `request` as raw bytes on a new connection to `port` (from the local address `from`,
/// 127.0.0.x: Linux answers the whole of 127/8) and reads until the server closes it or
/// `silence` seconds pass without a byte: what came back, whether the server closed it, and how long it took.
func rawExchange(
    port: Int, from: String = "127.0.0.1", silence: Int = 15, _ request: [UInt8]
) async throws -> (reply: String, closed: Bool, waited: Duration) {
    try await offPool { () throws -> (String, Bool, Duration) in
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        func address(_ host: String, _ port: Int) -> sockaddr_in {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr(host)
            return address
        }
        var local = address(from, 0)
        var remote = address("127.0.0.1", port)
        let bound = withUnsafePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        let connected = withUnsafePointer(to: &remote) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(bound == 0 && connected == 0)
        var timeout = timeval(tv_sec: silence, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var sent = 0
        while sent < request.count {
            let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { break } // the server may refuse before reading it all
            sent += n
        }
        let start = ContinuousClock.now
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        var read = 0
        repeat {
            read = recv(fd, &buffer, buffer.count, 0)
            if read > 0 { reply += buffer[0..<read] }
        } while read > 0
        // A reset after the answer (the server closed with bytes of ours unread) is a close too.
        let closed = read == 0 || (read < 0 && errno == ECONNRESET)
        return (String(decoding: reply, as: UTF8.self), closed, ContinuousClock.now - start)
    }
}
