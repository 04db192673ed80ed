import Foundation
import Logging

/// Everything the server reads from its environment. `docs/configuration.md` lists each variable.
public struct AppConfiguration: Sendable {
    public var host = "127.0.0.1"
    public var port = 8080
    /// The application role's connection URL (never the owner's).
    public var databaseURL = "postgres://herald_app:herald_app@127.0.0.1:5432/herald"
    /// Largest connection pool the server opens.
    public var databasePoolSize = 20
    /// A directory of `<kid>.pem` ES256 private keys; all verify, `jwtActiveKeyID` signs.
    public var jwtKeysDirectory = ".data/jwt"
    /// The key id that signs new tokens; default: the last file name in sort order.
    public var jwtActiveKeyID: String?
    public var jwtIssuer = "herald"
    public var jwtAudience = "herald-api"
    public var accessTokenTTL: TimeInterval = 15 * 60
    public var refreshTokenTTL: TimeInterval = 30 * 24 * 3600
    /// Clock skew allowed on `exp` and `nbf` (RFC 8725 asks for little; 60 s at most here).
    public var jwtLeeway: TimeInterval = 30
    /// argon2id cost: iterations, memory in KiB, lanes.
    public var argon2Iterations: UInt32 = 3
    public var argon2MemoryKiB: UInt32 = 64 * 1024
    public var argon2Parallelism: UInt32 = 1
    /// Failed logins allowed per account and per client address within `loginWindow` seconds.
    public var loginAttemptsPerAccount = 5
    public var loginAttemptsPerAddress = 20
    public var loginWindow: TimeInterval = 15 * 60
    /// Largest request body accepted, in bytes.
    public var maxBodyBytes = 1 << 20
    public var logLevel: Logger.Level = .info
    /// `json` (production) or `text`.
    public var logFormat = "json"

    public init() {}

    /// Reads the configuration from environment variables, keeping defaults for those unset.
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) throws -> AppConfiguration {
        var c = AppConfiguration()
        func value(_ name: String) -> String? { env[name].flatMap { $0.isEmpty ? nil : $0 } }
        func number<T: LosslessStringConvertible>(_ name: String, _ target: inout T) throws {
            guard let raw = value(name) else { return }
            guard let parsed = T(raw) else { throw ConfigurationError(variable: name, value: raw) }
            target = parsed
        }
        if let v = value("HERALD_HOST") { c.host = v }
        try number("HERALD_PORT", &c.port)
        if let v = value("DATABASE_URL") { c.databaseURL = v }
        try number("HERALD_DATABASE_POOL_SIZE", &c.databasePoolSize)
        if let v = value("HERALD_JWT_KEYS_DIR") { c.jwtKeysDirectory = v }
        c.jwtActiveKeyID = value("HERALD_JWT_ACTIVE_KID")
        if let v = value("HERALD_JWT_ISSUER") { c.jwtIssuer = v }
        if let v = value("HERALD_JWT_AUDIENCE") { c.jwtAudience = v }
        try number("HERALD_ACCESS_TOKEN_TTL", &c.accessTokenTTL)
        try number("HERALD_REFRESH_TOKEN_TTL", &c.refreshTokenTTL)
        try number("HERALD_JWT_LEEWAY", &c.jwtLeeway)
        guard (0...60).contains(c.jwtLeeway) else { throw ConfigurationError(variable: "HERALD_JWT_LEEWAY", value: "\(c.jwtLeeway) (0 to 60)") }
        try number("HERALD_ARGON2_ITERATIONS", &c.argon2Iterations)
        try number("HERALD_ARGON2_MEMORY_KIB", &c.argon2MemoryKiB)
        try number("HERALD_ARGON2_PARALLELISM", &c.argon2Parallelism)
        try number("HERALD_LOGIN_ATTEMPTS_PER_ACCOUNT", &c.loginAttemptsPerAccount)
        try number("HERALD_LOGIN_ATTEMPTS_PER_ADDRESS", &c.loginAttemptsPerAddress)
        try number("HERALD_LOGIN_WINDOW", &c.loginWindow)
        try number("HERALD_MAX_BODY_BYTES", &c.maxBodyBytes)
        if let v = value("HERALD_LOG_LEVEL") {
            guard let level = Logger.Level(rawValue: v) else { throw ConfigurationError(variable: "HERALD_LOG_LEVEL", value: v) }
            c.logLevel = level
        }
        if let v = value("HERALD_LOG_FORMAT") {
            guard ["json", "text"].contains(v) else { throw ConfigurationError(variable: "HERALD_LOG_FORMAT", value: v) }
            c.logFormat = v
        }
        return c
    }
}

/// An environment variable whose value Herald cannot use.
public struct ConfigurationError: Error, CustomStringConvertible {
    public var variable: String
    public var value: String
    public var description: String { "\(variable)=\(value) is not a valid value" }
}
