import CArgon2
import Foundation
import NIOPosix

/// argon2id password hashing through Debian's libargon2, off the cooperative thread pool
/// (one hash at the default cost takes about 0.2 s of CPU).
public struct PasswordHasher: Sendable {
    public var iterations: UInt32
    public var memoryKiB: UInt32
    public var parallelism: UInt32

    public init(iterations: UInt32, memoryKiB: UInt32, parallelism: UInt32) {
        self.iterations = iterations
        self.memoryKiB = memoryKiB
        self.parallelism = parallelism
    }

    /// The PHC-encoded hash (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), which carries its own parameters.
    public func hash(_ password: String) async throws -> String {
        try await NIOThreadPool.singleton.runIfActive { try hashNow(password) }
    }

    /// Whether `password` matches `encoded`. A malformed hash never matches.
    public func verify(_ password: String, against encoded: String) async throws -> Bool {
        try await NIOThreadPool.singleton.runIfActive {
            let pwd = Array(password.utf8)
            return encoded.withCString { hash in
                pwd.withUnsafeBytes { buffer in
                    argon2id_verify(hash, buffer.baseAddress, buffer.count) == ARGON2_OK.rawValue
                }
            }
        }
    }

    /// A hash of nothing in particular, verified when an account does not exist so that a
    /// login for an unknown email takes as long as one for a known email.
    /// Throws when the configured cost is one libargon2 refuses, so that shows at start-up.
    public func decoyHash() throws -> String {
        try hashNow("herald-decoy-password")
    }

    private func hashNow(_ password: String) throws -> String {
        var salt = [UInt8](repeating: 0, count: 16)
        var generator = SystemRandomNumberGenerator()
        for i in salt.indices { salt[i] = UInt8.random(in: 0...255, using: &generator) }
        let pwd = Array(password.utf8)
        let length = argon2_encodedlen(iterations, memoryKiB, parallelism, UInt32(salt.count), 32, Argon2_id)
        var encoded = [CChar](repeating: 0, count: length)
        let result = pwd.withUnsafeBytes { pwdBuffer in
            argon2id_hash_encoded(
                iterations, memoryKiB, parallelism, pwdBuffer.baseAddress, pwdBuffer.count,
                salt, salt.count, 32, &encoded, length)
        }
        guard result == ARGON2_OK.rawValue else { throw PasswordHashError(code: result) }
        return String(decoding: encoded.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// libargon2 refused to hash (for example a memory cost below its minimum).
public struct PasswordHashError: Error, CustomStringConvertible {
    public var code: Int32
    public var description: String { "argon2 failed: \(String(cString: argon2_error_message(code)))" }
}
