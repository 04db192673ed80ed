import AsyncHTTPClient
import Foundation
import HeraldStore
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import PostgresNIO
import Synchronization

@testable import HeraldAPI

/// Herald listening on a real port of 127.0.0.1 with live streams (a notification bus and a
/// stream hub of its own, as `herald serve` wires them) and the demo pages, on the shared test
/// database. `stop()` ends it as a crash would: the listening socket and every open connection
/// close at once, with no `end` event; `start()` brings a new instance up on the same port.
final class LiveServer: Sendable {
    let port: Int
    private let configure: @Sendable (inout AppConfiguration) -> Void
    private let running = Mutex<Task<Void, any Error>?>(nil)

    var url: String { "http://127.0.0.1:\(port)" }

    private init(port: Int, task: Task<Void, any Error>, configure: @escaping @Sendable (inout AppConfiguration) -> Void) {
        self.port = port
        self.configure = configure
        running.withLock { $0 = task }
    }

    /// Runs `body` with a server on a free port, stopped afterwards whatever happens.
    static func with<T>(
        configure: @escaping @Sendable (inout AppConfiguration) -> Void = { _ in },
        _ body: (LiveServer) async throws -> T
    ) async throws -> T {
        let (task, port) = try await launch(port: 0, configure: configure)
        let server = LiveServer(port: port, task: task, configure: configure)
        do {
            let result = try await body(server)
            await server.stop()
            return result
        } catch {
            await server.stop()
            throw error
        }
    }

    /// Stops the instance at once (a no-op when it is not running).
    func stop() async {
        guard
            let task = running.withLock({ task in
                defer { task = nil }; return task
            })
        else { return }
        task.cancel()
        _ = try? await task.value
    }

    /// A new instance on the same port.
    func start() async throws {
        await stop()
        let (task, _) = try await Self.launch(port: port, configure: configure)
        running.withLock { $0 = task }
    }

    /// Sends a request with an optional bearer token and JSON body; the status and the body.
    func send(
        _ method: HTTPMethod, _ path: String, token: String? = nil, json: String? = nil
    ) async throws -> (
        status: Int, text: String
    ) {
        var request = HTTPClientRequest(url: url + path)
        request.method = method
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(string: json))
        }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
        let body = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), String(buffer: body))
    }

    /// Starts an instance and returns once it listens, with the port it listens on.
    private static func launch(
        port: Int, configure: @Sendable (inout AppConfiguration) -> Void
    ) async throws -> (Task<Void, any Error>, Int) {
        let env = try await TestEnvironment.shared
        // A PostgreSQL client of its own, as a process has: the suite's shared pool is busy with
        // every other test, and a stream's reads must not queue behind them.
        let postgres = PostgresClient(configuration: try .fromURL(env.appURL), backgroundLogger: env.logger)
        let database = Database(client: postgres, logger: env.logger)
        let bus = NotificationBus(client: postgres, logger: env.logger)
        let hub = StreamHub(bus: bus, database: database, settings: StreamSettings(), logger: env.logger)
        let dependencies = AppDependencies(
            database: database, postgres: postgres, tokens: env.tokens, passwords: env.passwords,
            expectedMigrations: TestEnvironment.migrationVersions, linkKeys: TestEnvironment.linkKeys,
            services: [postgres, bus, hub], streams: hub)
        let configuration = env.configuration {
            $0.demoPages = true
            $0.host = "127.0.0.1"
            $0.port = port
            configure(&$0)
        }
        // `stop()` cancels the server, which HummingbirdCore logs as an error: expected here.
        var serverLogger = env.logger
        serverLogger.logLevel = .critical
        let listening = AsyncStream<Int>.makeStream()
        let app = Application(
            router: try buildRouter(configuration: configuration, dependencies: dependencies),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port)),
            services: dependencies.services,
            onServerRunning: { channel in
                listening.continuation.yield(channel.localAddress?.port ?? 0)
                listening.continuation.finish()
            },
            logger: serverLogger)
        let task = Task {
            defer { listening.continuation.finish() }
            try await app.run()
        }
        for await bound in listening.stream { return (task, bound) }
        // It stopped before it listened: its error says why.
        try await task.value
        throw ServerDidNotStart(port: port)
    }

    struct ServerDidNotStart: Error { var port: Int }
}
