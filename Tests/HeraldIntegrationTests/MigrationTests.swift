import Foundation
import HeraldCore
import HeraldStore
import Logging
import PostgresNIO
import Testing

@testable import HeraldAPI

/// The migrator against scratch databases made by the owner role.
@Suite("Migrations")
struct MigrationTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// A fresh, empty database for one test, dropped afterwards.
    func withScratchDatabase(_ body: @Sendable (PostgresClient) async throws -> Void) async throws {
        let name = "scratch_\(UUID().uuidString.prefix(8).lowercased())"
        try await withClient(env.ownerURL) { try await $0.query("CREATE DATABASE \(unescaped: name)", logger: env.logger) }
        var url = URLComponents(string: env.ownerURL)!
        url.path = "/" + name
        do {
            try await withClient(url.string!, body)
        } catch {
            try? await withClient(env.ownerURL) {
                _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger)
            }
            throw error
        }
        try await withClient(env.ownerURL) { _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger) }
    }

    func withClient(_ url: String, _ body: @Sendable (PostgresClient) async throws -> Void) async throws {
        let client = PostgresClient(configuration: try .fromURL(url), backgroundLogger: env.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            try await body(client)
        }
    }

    static let sample = [
        Migration(version: 1, name: "0001_a", sql: "CREATE TABLE a (x int); INSERT INTO a VALUES (1);"),
        Migration(version: 2, name: "0002_b", sql: "CREATE TABLE b (y int);"),
    ]

    @Test("applies pending migrations once, in order, and records their checksums")
    func appliesOnce() async throws {
        try await withScratchDatabase { client in
            let migrator = Migrator(client: client, logger: env.logger)
            #expect(try await migrator.migrate(Self.sample).map(\.version) == [1, 2])
            #expect(try await migrator.migrate(Self.sample).isEmpty)
            let rows = try await client.query("SELECT count(*) FROM a", logger: env.logger)
            for try await n in rows.decode(Int.self) { #expect(n == 1) }
        }
    }

    @Test("refuses a migration changed after it was applied")
    func checksumMismatch() async throws {
        try await withScratchDatabase { client in
            let migrator = Migrator(client: client, logger: env.logger)
            try await migrator.migrate(Self.sample)
            var edited = Self.sample
            edited[0].sql += " -- edited"
            await #expect(throws: MigrationError.checksumMismatch(version: 1, name: "0001_a")) {
                try await migrator.migrate(edited)
            }
        }
    }

    @Test("a failing migration rolls back whole and is not recorded")
    func failingRollsBack() async throws {
        try await withScratchDatabase { client in
            let migrator = Migrator(client: client, logger: env.logger)
            let broken = [Migration(version: 1, name: "0001_broken", sql: "CREATE TABLE c (z int); SELECT no_such_function();")]
            await #expect(throws: (any Error).self) { try await migrator.migrate(broken) }
            let rows = try await client.query(
                "SELECT to_regclass('c') IS NULL, (SELECT count(*) FROM schema_migrations)", logger: env.logger)
            for try await (absent, recorded) in rows.decode((Bool, Int).self) {
                #expect(absent)
                #expect(recorded == 0)
            }
        }
    }

    @Test("two migrators at once: the advisory lock lets one apply, the other finds nothing to do")
    func concurrentMigrators() async throws {
        // This test failed once beside other scratch-database tests with a PSQLError whose
        // description hides the server's message: the whole error is recorded.
        do {
            try await withScratchDatabase { client in
                let slow = [Migration(version: 1, name: "0001_slow", sql: "SELECT pg_sleep(0.3); CREATE TABLE d (x int);")]
                async let first = Migrator(client: client, logger: env.logger).migrate(slow)
                async let second = Migrator(client: client, logger: env.logger).migrate(slow)
                let applied = try await first.count + second.count
                #expect(applied == 1)
            }
        } catch {
            Issue.record("\(String(reflecting: error))")
        }
    }

    @Test("the build ships exactly the repository's migrations, whatever the working directory")
    func shippedMatchRepository() throws {
        // setup: the resource copy (no override) and the reviewed files in sql/migrations
        let shipped = try Migration.shipped(environment: [:])
        let repository = try Migration.load(
            from: URL(fileURLWithPath: #filePath)
                .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("sql/migrations"))
        // check
        #expect(!shipped.isEmpty)
        #expect(shipped == repository, "the build's copy of sql/migrations is stale: rebuild")
    }

    @Test("the repository's migrations apply to an empty database")
    func repositoryMigrations() async throws {
        let all = try Migration.shipped()
        #expect(!all.isEmpty)
        try await withScratchDatabase { client in
            let applied = try await Migrator(client: client, logger: env.logger).migrate(all)
            #expect(applied.count == all.count)
        }
    }
}
