import AsyncHTTPClient
import Foundation
import Glibc
import HeraldStore
import Hummingbird
import HummingbirdWSClient
import HummingbirdWebSocket
import JWTKit
import Logging
import NIOCore
import NIOHTTP1
import NIOWebSocket
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI

/// Herald on a real port with live streams wired as `herald serve` wires them (its own
/// notification bus and stream hub, the WebSocket upgrade router), on the shared database.
/// Each instance has its own bus, so two of them are two listeners, as two processes are.
/// Something streams can be opened on: an in-process server or a `herald serve` process.
protocol StreamHost: Sendable {
    var port: Int { get }
}

extension StreamHost {
    var url: String { "http://127.0.0.1:\(port)" }

    /// A request; the status and the body.
    func send(_ method: HTTPMethod, _ path: String, token: String? = nil, json: String? = nil) async throws -> (status: Int, text: String) {
        var request = HTTPClientRequest(url: url + path)
        request.method = method
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(string: json))
        }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
        return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
    }

    /// A fresh stream ticket's text.
    func ticket(_ token: String) async throws -> String {
        let (status, text) = try await send(.POST, "/v1/me/stream-tickets", token: token)
        #expect(status == 201, "\(text)")
        return try #require(json(text)["ticket"] as? String)
    }
}

struct StreamServer: StreamHost {
    let port: Int
    let hub: StreamHub
    /// The instance's feed cache, when it was started with one.
    var cache: FeedCache? = nil

    /// Runs `body` with a server (or several: `count`) on free ports, stopped afterwards.
    static func with(
        count: Int = 1,
        now: @escaping @Sendable () -> Date = { Date() },
        settings: @escaping @Sendable (inout StreamSettings) -> Void = { _ in },
        feedCacheSeconds: TimeInterval? = nil,
        configure: (inout AppConfiguration) -> Void = { _ in },
        _ body: ([StreamServer]) async throws -> Void
    ) async throws {
        let env = try await TestEnvironment.shared
        var tasks: [Task<Void, any Error>] = []
        var servers: [StreamServer] = []
        defer { for task in tasks { task.cancel() } }
        for _ in 0..<count {
            // A client of its own: its bus's LISTEN connection is this instance's.
            let postgres = PostgresClient(configuration: try .fromURL(env.appURL), backgroundLogger: env.logger)
            let database = Database(client: postgres, logger: env.logger)
            let bus = NotificationBus(client: postgres, logger: env.logger)
            var streamSettings = StreamSettings()
            settings(&streamSettings)
            let hub = StreamHub(bus: bus, database: database, settings: streamSettings, logger: env.logger, now: now)
            let cache = feedCacheSeconds.map { FeedCache(lifetime: $0, bus: bus, now: now) }
            let dependencies = AppDependencies(
                database: database, postgres: postgres, tokens: env.tokens, passwords: env.passwords,
                expectedMigrations: TestEnvironment.migrationVersions, linkKeys: TestEnvironment.linkKeys,
                services: [bus, hub] + (cache.map { [$0] } ?? []), streams: hub, feedCache: cache, now: now)
            let configuration = env.configuration {
                $0.port = 0
                configure(&$0)
            }
            let listening = AsyncStream<Int>.makeStream()
            let app = try buildApplication(
                configuration: configuration, dependencies: dependencies, logger: env.logger,
                onServerRunning: { port in
                    listening.continuation.yield(port)
                    listening.continuation.finish()
                })
            tasks.append(
                Task {
                    defer { listening.continuation.finish() }
                    try await app.run()
                })
            var bound: Int?
            for await port in listening.stream { bound = port }
            guard let bound else { throw ServerDidNotStart() }
            servers.append(StreamServer(port: bound, hub: hub, cache: cache))
        }
        // The bus says `missedMessages` once it listens; until then a notify could go unheard.
        for server in servers { try await server.waitUntilListening() }
        try await body(servers)
    }

    struct ServerDidNotStart: Error {}

    func waitUntilListening() async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while hub.bus.listenerProcessID == nil || cache.map({ !$0.isServing }) == true {
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "the bus to listen") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

}

struct StreamTestTimeout: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out waiting for \(what)" }
}

func json(_ text: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
}

/// One message of a stream, whatever the transport.
struct StreamMessage: Sendable, CustomStringConvertible {
    var id: Int64?
    var event: String
    var data: String
    var object: [String: Any] { json(data) }
    var description: String { "\(id.map(String.init) ?? "-") \(event) \(data)" }
}

enum StreamTransport: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sse, socket
    var testDescription: String { rawValue }
}

/// A test client of the live feed: an SSE response read as it arrives, or a WebSocket. What
/// arrives is kept; `next(_:)` waits for the next message of a kind with a deadline.
final class StreamProbe: Sendable {
    let status: Int
    /// The refusal's body, when `status` is not 200 (SSE) or the socket's error message.
    let refusal: String
    private let received = Mutex<[StreamMessage]>([])
    private let consumed = Mutex<Int>(0)
    private let closed = Mutex<Bool>(false)
    private let reader = Mutex<Task<Void, Never>?>(nil)
    private let commands = Mutex<AsyncStream<String>.Continuation?>(nil)

    private init(status: Int, refusal: String) {
        self.status = status
        self.refusal = refusal
    }

    var isClosed: Bool { closed.withLock { $0 } }
    var all: [StreamMessage] { received.withLock { $0 } }

    /// Opens a stream. `query` is appended as is (`ticket=…&since=…`).
    static func open(
        _ transport: StreamTransport, on server: some StreamHost, token: String? = nil, query: String = "", lastEventID: String? = nil
    ) async throws -> StreamProbe {
        switch transport {
        case .sse: try await sse(on: server, token: token, query: query, lastEventID: lastEventID)
        case .socket: try await socket(on: server, token: token, query: query)
        }
    }

    static func sse(on server: some StreamHost, token: String?, query: String, lastEventID: String?) async throws -> StreamProbe {
        var request = HTTPClientRequest(url: server.url + StreamRoutes.streamPath + (query.isEmpty ? "" : "?\(query)"))
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let lastEventID { request.headers.add(name: "Last-Event-ID", value: lastEventID) }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(600))
        guard response.status == .ok else {
            let body = try await response.body.collect(upTo: 1 << 16)
            let probe = StreamProbe(status: Int(response.status.code), refusal: String(buffer: body))
            probe.closed.withLock { $0 = true }
            return probe
        }
        let probe = StreamProbe(status: 200, refusal: "")
        let task = Task {
            var pending = ""
            do {
                for try await chunk in response.body {
                    pending += String(buffer: chunk)
                    while let end = pending.range(of: "\n\n") {
                        let block = String(pending[..<end.lowerBound])
                        pending = String(pending[end.upperBound...])
                        if let message = Self.parse(block) { probe.received.withLock { $0.append(message) } }
                    }
                }
            } catch {}
            probe.closed.withLock { $0 = true }
        }
        probe.reader.withLock { $0 = task }
        return probe
    }

    /// An SSE block: `event:`/`data:`/`id:` lines; comments (heartbeats) and `retry:` become
    /// messages named `:comment` and `:retry`.
    static func parse(_ block: String) -> StreamMessage? {
        var message = StreamMessage(id: nil, event: "message", data: "")
        var sawField = false
        for line in block.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix(":") { return StreamMessage(id: nil, event: ":comment", data: String(line.dropFirst())) }
            guard let colon = line.firstIndex(of: ":") else { continue }
            let field = line[..<colon]
            var value = line[line.index(after: colon)...]
            if value.hasPrefix(" ") { value = value.dropFirst() }
            sawField = true
            switch field {
            case "id": message.id = Int64(value)
            case "event": message.event = String(value)
            case "data": message.data += message.data.isEmpty ? String(value) : "\n" + value
            case "retry": return StreamMessage(id: nil, event: ":retry", data: String(value))
            default: break
            }
        }
        return sawField ? message : nil
    }

    static func socket(on server: some StreamHost, token: String?, query: String) async throws -> StreamProbe {
        let probe = StreamProbe(status: 101, refusal: "")
        let (commands, continuation) = AsyncStream.makeStream(of: String.self)
        probe.commands.withLock { $0 = continuation }
        var headers = HTTPFields()
        if let token { headers[.authorization] = "Bearer \(token)" }
        let url = "ws://127.0.0.1:\(server.port)\(StreamRoutes.socketPath)" + (query.isEmpty ? "" : "?\(query)")
        let logger = Logger(label: "stream-probe")
        let task = Task {
            // A failed connection or handshake is kept as a `:failed` message, so that a test
            // waiting for a message says why none came.
            do {
                let closeFrame = try await WebSocketClient.connect(
                    url: url, configuration: .init(additionalHeaders: headers), logger: logger
                ) { inbound, outbound, _ in
                    // The handshake is done: a wait that times out after this was the server's.
                    probe.received.withLock { $0.append(StreamMessage(id: nil, event: ":upgraded", data: "")) }
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask {
                            for try await message in inbound.messages(maxSize: 1 << 20) {
                                guard case .text(let text) = message else { continue }
                                let object = json(text)
                                let event = object["event"] as? String ?? "?"
                                let data =
                                    object["data"].flatMap { try? JSONSerialization.data(withJSONObject: $0) }
                                    .map { String(decoding: $0, as: UTF8.self) } ?? text
                                probe.received.withLock {
                                    $0.append(StreamMessage(id: (object["id"] as? NSNumber)?.int64Value, event: event, data: data))
                                }
                            }
                        }
                        group.addTask {
                            for await command in commands { try await outbound.write(.text(command)) }
                            try await outbound.close(.normalClosure, reason: nil)
                        }
                        try await group.next()
                        group.cancelAll()
                    }
                }
                if let closeFrame {
                    probe.received.withLock {
                        $0.append(StreamMessage(id: nil, event: ":closed", data: "\(closeFrame.closeCode) \(closeFrame.reason ?? "")"))
                    }
                }
            } catch {
                probe.received.withLock { $0.append(StreamMessage(id: nil, event: ":failed", data: "\(error)")) }
            }
            probe.closed.withLock { $0 = true }
        }
        probe.reader.withLock { $0 = task }
        return probe
    }

    /// Sends a command on a socket.
    func send(_ command: String) {
        _ = commands.withLock { $0?.yield(command) }
    }

    /// The next message named `event` (after those already taken by `next`), within `limit`.
    /// The default is generous on purpose: it bounds a wait, it does not measure speed (the
    /// benchmarks do). In a full suite on two cores the test process itself is sometimes so
    /// busy that a sweep or a read runs seconds late (seen: a row numbered 7 s after its notify
    /// committed, while dozens of the suite's own transactions sat idle waiting for it).
    @discardableResult
    func next(
        _ event: String, within limit: Duration = .seconds(30), where accept: (StreamMessage) -> Bool = { _ in true }
    )
        async throws -> StreamMessage
    {
        let deadline = ContinuousClock.now + limit
        while true {
            let found: StreamMessage? = received.withLock { messages in
                let start = consumed.withLock { $0 }
                guard start < messages.count,
                    let index = messages[start...].firstIndex(where: { $0.event == event && accept($0) })
                else { return nil }
                consumed.withLock { $0 = index + 1 }
                return messages[index]
            }
            if let found { return found }
            guard ContinuousClock.now < deadline else {
                throw StreamTestTimeout(
                    what: "\(event) (received: \(all.map(\.description).joined(separator: " | ")); closed: \(isClosed))")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// Waits until the server has closed the stream.
    func waitUntilClosed(within limit: Duration = .seconds(5)) async throws {
        let deadline = ContinuousClock.now + limit
        while !isClosed {
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "the stream to close") }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    func close() async {
        _ = commands.withLock { $0?.finish() }
        let task = reader.withLock { $0 }
        task?.cancel()
        await task?.value
    }

    /// The ids of the `notification.created` events received.
    var createdIDs: [String] {
        all.filter { $0.event == "notification.created" }.compactMap { $0.object["id"] as? String }
    }
}

/// `herald serve` as a process of its own, on the port given, with `environment` on top of the
/// test run's own. Subclasses say which database and settings.
class HeraldServeProcess: StreamHost, @unchecked Sendable {
    /// The binary `make test` built.
    static var binary: URL {
        URL(fileURLWithPath: ProcessInfo.processInfo.environment["HERALD_TEST_BINARY"] ?? ".build/debug/herald")
    }

    let process = Process()
    let port: Int

    init(port: Int, environment: [String: String], standardError: FileHandle = .nullDevice) throws {
        self.port = port
        process.executableURL = Self.binary
        process.arguments = ["serve"]
        var environment = environment
        environment["HERALD_PORT"] = "\(port)"
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.standardOutput = FileHandle.nullDevice
        process.standardError = standardError
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// SIGTERM, and how long until the process exited.
    func terminate() async throws -> Duration {
        let started = ContinuousClock.now
        process.terminate()
        try await offPool { [process] in process.waitUntilExit() }
        return ContinuousClock.now - started
    }

    func kill() {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

/// `herald serve` with live streams and the demo pages on the shared test database, signing
/// with the keys of `keysDirectory()`: its tokens come from `login`.
final class StreamServeProcess: HeraldServeProcess, @unchecked Sendable {
    /// `extra`: more settings, given the port the process listens on.
    init(port: Int, keys: String, extra: (Int) -> [String: String] = { _ in [:] }) throws {
        let env = ProcessInfo.processInfo.environment
        try super.init(
            port: port,
            environment: extra(port).merging([
                "DATABASE_URL": env["HERALD_TEST_DATABASE_URL"] ?? "",
                "DATABASE_WORKER_URL": "",
                "HERALD_JWT_KEYS_DIR": keys,
                "HERALD_WORKERS": "0",
                // Other suites' chunked fan-outs are theirs to expand.
                "HERALD_FANOUT_RUNNERS": "0",
                "HERALD_DEMO_PAGES": "1",
                "HERALD_SHUTDOWN_SECONDS": "20",
                "HERALD_LOG_LEVEL": "error",
                "HERALD_LOG_FORMAT": "text",
            ]) { mine, _ in mine })
    }

    /// A directory with a fresh signing key, made by `herald jwt-keygen`.
    static func keysDirectory() throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("herald-streams-\(UUID().uuidString.prefix(8))").path
        let keygen = Process()
        keygen.executableURL = binary
        keygen.arguments = ["jwt-keygen", "--dir", directory]
        keygen.standardOutput = FileHandle.nullDevice
        try keygen.run()
        keygen.waitUntilExit()
        return directory
    }

    /// An access token from a password login (`TestOrganisation.password`).
    func login(_ email: String, of org: TestOrganisation) async throws -> String {
        let (status, text) = try await send(
            .POST, "/v1/auth/token",
            json: "{\"organisation\":\"\(org.slug)\",\"email\":\"\(email)\",\"password\":\"\(TestOrganisation.password)\"}")
        #expect(status == 200, "\(text)")
        return try #require(json(text)["access_token"] as? String)
    }

    /// A process on a random port, started again on another port if it exits before it is
    /// ready (the port was taken: the range is inside the kernel's ephemeral ports).
    static func start(keys: String, extra: (Int) -> [String: String] = { _ in [:] }) async throws -> StreamServeProcess {
        var attempt = 1
        while true {
            let server = try StreamServeProcess(port: Int.random(in: 41_000..<49_000), keys: keys, extra: extra)
            do {
                try await server.waitUntilReady()
                return server
            } catch is ServeExited where attempt < 3 {
                attempt += 1
            }
        }
    }

    func waitUntilReady(within limit: Duration = .seconds(60)) async throws {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            guard process.isRunning else { throw ServeExited(port: port, status: process.terminationStatus) }
            if let response = try? await HTTPClient.shared.execute(HTTPClientRequest(url: url + "/readyz"), timeout: .seconds(2)),
                response.status == .ok
            {
                return
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw StreamTestTimeout(what: "herald serve on port \(port)")
    }

    struct ServeExited: Error { var port: Int, status: Int32 }
}
