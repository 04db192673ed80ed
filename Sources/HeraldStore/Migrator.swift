import Crypto
import Foundation
import HeraldCore
import HeraldMigrations
import Logging
import PostgresNIO

/// A numbered SQL file under `sql/migrations`, e.g. `0001_foundation.sql`.
public struct Migration: Sendable, Equatable {
    public var version: Int
    public var name: String
    public var sql: String

    /// SHA-256 of the file's text; a file changed after it was applied is refused.
    public var checksum: String {
        SHA256.hash(data: Data(sql.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    public init(version: Int, name: String, sql: String) {
        self.version = version
        self.name = name
        self.sql = sql
    }

    /// Where the migrations of this build are: `$HERALD_SQL_DIR/migrations` when that is set
    /// (an override for development), otherwise the copy shipped with the build as a resource.
    public static func shippedDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> URL {
        if let override = environment["HERALD_SQL_DIR"], !override.isEmpty {
            return URL(fileURLWithPath: override).appendingPathComponent("migrations", isDirectory: true)
        }
        return ShippedMigrations.directory
    }

    /// The migrations of this build (see `shippedDirectory`), in version order.
    public static func shipped(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> [Migration] {
        try load(from: shippedDirectory(environment: environment))
    }

    /// Reads every `NNNN_name.sql` in `directory`, in version order.
    public static func load(from directory: URL) throws -> [Migration] {
        let files = try FileManager.default.contentsOfDirectory(atPath: directory.path)
            .filter { $0.hasSuffix(".sql") }
            .sorted()
        var seen = Set<Int>()
        return try files.map { file in
            guard let underscore = file.firstIndex(of: "_"), let version = Int(file[..<underscore]) else {
                throw MigrationError.badFileName(file)
            }
            guard seen.insert(version).inserted else { throw MigrationError.duplicateVersion(version) }
            let sql = try String(contentsOf: directory.appendingPathComponent(file), encoding: .utf8)
            return Migration(version: version, name: String(file.dropLast(4)), sql: sql)
        }
    }
}

/// Why migrating stopped.
public enum MigrationError: Error, CustomStringConvertible, Equatable {
    case badFileName(String)
    case duplicateVersion(Int)
    case checksumMismatch(version: Int, name: String)
    case unknownVersionApplied(Int)

    public var description: String {
        switch self {
        case .badFileName(let file): "\(file): migration files are named NNNN_description.sql"
        case .duplicateVersion(let version): "two migration files have version \(version)"
        case .checksumMismatch(let version, let name):
            "migration \(version) (\(name)) was changed after it was applied; add a new migration instead of editing an applied one"
        case .unknownVersionApplied(let version):
            "the database has migration \(version) applied, which this build does not know; is an older build migrating a newer database?"
        }
    }
}

/// Applies migrations as the owner role. Each runs in its own transaction; an advisory lock
/// keeps two instances from migrating at once.
public struct Migrator: Sendable {
    /// Arbitrary, fixed: "herald" in ASCII.
    static let lockKey: Int64 = 0x68_65_72_61_6c_64
    let client: PostgresClient
    let logger: Logger

    public init(client: PostgresClient, logger: Logger) {
        self.client = client
        self.logger = logger
    }

    /// Applies what is pending; returns the migrations it applied. `progress` hears each step.
    @discardableResult
    public func migrate(_ migrations: [Migration], progress: @Sendable (String) -> Void = { _ in }) async throws -> [Migration] {
        try await client.withConnection { connection in
            // A session-level lock: held across the per-migration transactions below.
            try await connection.query("SELECT pg_advisory_lock(\(Self.lockKey))", logger: logger)
            do {
                let applied = try await apply(migrations, on: connection, progress: progress)
                try await connection.query("SELECT pg_advisory_unlock(\(Self.lockKey))", logger: logger)
                return applied
            } catch {
                _ = try? await connection.query("SELECT pg_advisory_unlock(\(Self.lockKey))", logger: logger)
                throw error
            }
        }
    }

    private func apply(
        _ migrations: [Migration], on connection: PostgresConnection, progress: @Sendable (String) -> Void
    ) async throws -> [Migration] {
        // The migrator's own bookkeeping: global, not tenant data, so it has no row-level security.
        try await connection.query(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """, logger: logger)
        var recorded: [Int: (name: String, checksum: String)] = [:]
        let rows = try await connection.query("SELECT version, name, checksum FROM schema_migrations", logger: logger)
        for try await (version, name, checksum) in rows.decode((Int, String, String).self) {
            recorded[version] = (name, checksum)
        }
        let known = Dictionary(uniqueKeysWithValues: migrations.map { ($0.version, $0) })
        if let unknown = recorded.keys.sorted().first(where: { known[$0] == nil }) {
            throw MigrationError.unknownVersionApplied(unknown)
        }
        var applied: [Migration] = []
        for migration in migrations.sorted(by: { $0.version < $1.version }) {
            if let existing = recorded[migration.version] {
                guard existing.checksum == migration.checksum else {
                    throw MigrationError.checksumMismatch(version: migration.version, name: migration.name)
                }
                continue
            }
            progress("applying \(migration.name)")
            let started = ContinuousClock.now
            try await connection.withTransaction(logger: logger) { tx in
                // The file is trusted text from the repository, not a value: sent as is, one
                // statement at a time (the extended protocol takes one per message).
                for statement in SQLScript.statements(migration.sql) {
                    try await tx.query(PostgresQuery(unsafeSQL: statement), logger: logger)
                }
                try await tx.query(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (\(migration.version), \(migration.name), \(migration.checksum))",
                    logger: logger)
            }
            progress("applied \(migration.name) in \(ContinuousClock.now - started)")
            applied.append(migration)
        }
        // The server checks readiness against this table.
        try await connection.query("GRANT SELECT ON schema_migrations TO herald_app", logger: logger)
        return applied
    }
}
