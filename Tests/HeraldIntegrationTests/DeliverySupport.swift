import AsyncHTTPClient
import Foundation
import HeraldCore
import Logging
import NIOCore
import NIOHTTP1
import PostgresNIO
import Testing

@testable import HeraldDelivery
@testable import HeraldStore

/// The peers `make test` starts (scripts/peers.py): an SMTP server that keeps every message
/// and an HTTP receiver whose behaviour each test configures by name.
enum Peers {
    static var receiverURL: String { ProcessInfo.processInfo.environment["HERALD_TEST_RECEIVER_URL"] ?? "http://127.0.0.1:24326" }
    static var smtpURL: String { ProcessInfo.processInfo.environment["HERALD_TEST_SMTP_URL"] ?? "smtp://127.0.0.1:24325" }

    /// A fresh receiver name and its URL.
    static func hook(_ prefix: String = "hook") -> (name: String, url: String) {
        let name = "\(prefix)-\(UUID().uuidString.prefix(12).lowercased())"
        return (name, "\(receiverURL)/hooks/\(name)")
    }

    static func configure(_ name: String, _ settings: [String: any Sendable]) async throws {
        _ = try await request(.PUT, "/_config/\(name)", json: settings)
    }

    static func requests(_ name: String) async throws -> [[String: Any]] {
        try await request(.GET, "/_requests/\(name)") as? [[String: Any]] ?? []
    }

    static func ids(_ name: String) async throws -> [String: Any] {
        try await request(.GET, "/_ids/\(name)") as? [String: Any] ?? [:]
    }

    /// Verifies every request the receiver got under `name` with the `standardwebhooks` package.
    static func verify(_ name: String, secret: String) async throws -> (verified: Int, failed: [Any]) {
        let answer = try await request(.POST, "/_verify", json: ["name": name, "secret": secret]) as? [String: Any] ?? [:]
        return (answer["verified"] as? Int ?? -1, answer["failed"] as? [Any] ?? [])
    }

    static func mail(to address: String) async throws -> [[String: Any]] {
        let query = address.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? address
        return try await request(.GET, "/_mail?rcpt=\(query)") as? [[String: Any]] ?? []
    }

    @discardableResult
    static func request(_ method: HTTPMethod, _ path: String, json: [String: any Sendable]? = nil) async throws -> Any {
        var request = HTTPClientRequest(url: receiverURL + path)
        request.method = method
        if let json {
            request.headers.add(name: "content-type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: json)))
        }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
        let body = try await response.body.collect(upTo: 64 << 20)
        return try JSONSerialization.jsonObject(with: Data(body.readableBytesView), options: [.fragmentsAllowed])
    }
}

/// Worker pools in the test process, confined to one organisation so parallel tests never take
/// each other's deliveries.
enum TestWorkers {
    struct Settings {
        var concurrency = 4
        var retry = RetryPolicy(baseDelay: 0.3, factor: 2, maximumDelay: 5, jitter: 0)
        var pollInterval: Duration = .milliseconds(200)
        var leaseSeconds = 10
        /// The receiver is on loopback; the SSRF guard allows exactly its address.
        var allowed = ["127.0.0.1/32"]
        var pools = 1
        var sendTimeout: TimeAmount = .seconds(5)
        /// Sends in flight to one endpoint per pool; nil: every slot may serve one endpoint.
        var endpointConcurrency: Int?
        var endpointBusyDelay: TimeInterval?
        var circuitFailures: Int?
        var circuitCooldown: TimeInterval?
    }

    /// Runs pools for `organisation` while `body` runs. `database` and `listenClient` (the
    /// worker role's) default to the shared test database's.
    static func run<T: Sendable>(
        _ organisation: UUID, _ settings: Settings = Settings(),
        database: Database? = nil, listenClient: PostgresClient? = nil,
        _ body: @Sendable () async throws -> T
    ) async throws -> T {
        let env = try await TestEnvironment.shared
        let (sender, http) = Self.sender(settings)
        // The pools share one bus, as the workers of one process do.
        let bus = NotificationBus(client: listenClient ?? env.workerClient, logger: env.logger)
        let pools = (0..<settings.pools).map { index in
            var configuration = WorkerPoolConfiguration(name: "test-\(index)-\(UUID().uuidString.prefix(6))")
            configuration.organisation = organisation
            configuration.concurrency = settings.concurrency
            // Most tests are about one endpoint at a time: every slot may serve it (the
            // per-endpoint limit and the breaker have their own tests in FaultTests).
            configuration.endpointConcurrency = settings.endpointConcurrency ?? settings.concurrency
            if let delay = settings.endpointBusyDelay { configuration.endpointBusyDelay = delay }
            if let failures = settings.circuitFailures { configuration.circuitFailures = failures }
            if let cooldown = settings.circuitCooldown { configuration.circuitCooldown = cooldown }
            configuration.retry = settings.retry
            configuration.pollInterval = settings.pollInterval
            configuration.leaseSeconds = settings.leaseSeconds
            return DeliveryWorkerPool(
                configuration: configuration, database: database ?? env.workerDatabase, bus: bus, sender: sender, logger: env.logger)
        }
        let result = try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                try await bus.run(); return nil
            }
            for pool in pools {
                group.addTask {
                    try await pool.run(); return nil
                }
            }
            let value = try await body()
            group.cancelAll()
            for try await _ in group {}
            return value
        }
        try await http.shutdown()
        return result
    }

    /// The sender the pools use, to the test peers; shut the HTTP transport down after use.
    static func sender(_ settings: Settings = Settings()) -> (DeliverySender, HTTPTransport) {
        let http = HTTPTransport(
            destinations: DestinationGuard(allowed: settings.allowed.compactMap { IPNetwork($0) }), timeout: settings.sendTimeout,
            connectionsPerHost: settings.concurrency)
        let sender = DeliverySender(
            email: EmailTransport(
                settings: EmailTransport.settings(url: Peers.smtpURL, username: nil, password: nil, timeout: 10)!,
                defaultFrom: "herald@herald.test"),
            http: http, links: LinkBuilder(baseURL: "http://herald.test", keys: TestEnvironment.linkKeys))
        return (sender, http)
    }
}

/// One pool's queue and handler without its runner, confined to one organisation, for tests
/// that take an attempt step by step: claim, change the world, handle, record. Shut `http` down
/// after use.
struct DirectWorker {
    let queue: OutboxQueue
    let handler: DeliveryHandler
    let slots = EndpointSlots(limit: 4)
    let http: HTTPTransport
    let name = "direct-\(UUID().uuidString.prefix(6))"
    let logger: Logger

    init(_ organisation: UUID) async throws {
        let env = try await TestEnvironment.shared
        let (sender, http) = TestWorkers.sender()
        self.http = http
        logger = env.logger
        handler = DeliveryHandler(
            database: env.workerDatabase, sender: sender, slots: slots, endpointBusyDelay: 1, circuitCooldown: 60, retry: RetryPolicy())
        queue = OutboxQueue(
            database: env.workerDatabase, organisation: organisation, circuit: CircuitRule(failures: 5, cooldown: 60), slots: slots)
    }

    /// Claims what is due, as the pool would (up to 10).
    func claim() async throws -> [ClaimedDelivery] {
        try await queue.claim(worker: name, limit: 10, leaseSeconds: 30)
    }

    /// Records how an attempt ended, as the runner would; false when the fence refused.
    func complete(_ claim: ClaimedDelivery, _ record: DeliveryAttemptRecord) async throws -> Bool {
        try await queue.complete(claim, worker: name, startedAt: Date(), outcome: record, logger: logger)
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
func eventually(
    timeout: Duration = .seconds(30), every interval: Duration = .milliseconds(100),
    _ condition: () async throws -> Bool
) async throws -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: interval)
    }
    return try await condition()
}

extension TestOrganisation {
    /// Every delivery of the organisation (up to 20 000), newest first.
    func deliveries(_ filter: DeliveryFilter = DeliveryFilter()) async throws -> [Delivery] {
        try await store { tx in try await tx.deliveries(filter, limit: 20_000, after: nil).items }
    }

    /// Waits until no delivery of the organisation is PENDING, SENDING or FAILED.
    func settled(timeout: Duration = .seconds(60)) async throws -> [Delivery] {
        _ = try await eventually(timeout: timeout) {
            try await deliveries().allSatisfy { [DeliveryStatus.sent, .dead, .cancelled].contains($0.status) }
        }
        return try await deliveries()
    }

    /// A notification type in the activity category that goes to `channels` by default.
    func deliveryType(
        _ key: String, category: UUID, channels: [NotificationChannel], templates: [NotificationChannel: TemplateContent] = [:]
    ) async throws {
        try await store { tx in
            let type = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: key, categoryID: category, name: "Type \(key)", description: "", defaultSeverity: .info, defaultPriority: .normal,
                    defaultChannels: channels))
            for (channel, content) in templates {
                try await tx.putTemplate(typeID: type.id, channel: channel, locale: "en", content: content)
            }
        }
    }
}

/// A raw RFC 5322 message parsed by Python's `email` package (an independent parser): the
/// headers as received and each MIME part decoded.
struct ParsedMail {
    var headers: [String: String]
    var parts: [String: String]

    init(_ raw: String) throws {
        let script = """
            import email, email.policy, json, sys
            m = email.message_from_string(sys.stdin.read(), policy=email.policy.default)
            parts = {p.get_content_type(): p.get_content() for p in m.walk() if not p.is_multipart()}
            print(json.dumps({"headers": {k: str(v) for k, v in m.items()}, "parts": parts, "defects": [str(d) for d in m.defects]}))
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script]
        let input = Pipe(), output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        try process.run()
        input.fileHandleForWriting.write(Data(raw.utf8))
        try input.fileHandleForWriting.close()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let json = try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
        headers = json["headers"] as? [String: String] ?? [:]
        parts = json["parts"] as? [String: String] ?? [:]
    }
}
