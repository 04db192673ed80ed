import Crypto
import Foundation
import HeraldCore

/// A credential Herald hands out as `prefix.organisation.id.secret`: API keys (`hk`) and
/// refresh tokens (`hrt`), stream tickets (`hst`). The organisation id lets the server set the tenant context before
/// it looks the token up; only SHA-256 of the secret is stored (the secret is 256 random bits,
/// so a slow hash adds nothing).
public struct OpaqueToken: Sendable, Equatable {
    public enum Kind: String, Sendable { case apiKey = "hk", refresh = "hrt", streamTicket = "hst" }

    public var kind: Kind
    public var organisationID: UUID
    public var id: UUID
    public var secret: String

    /// A new token with a fresh random secret.
    public init(kind: Kind, organisationID: UUID, id: UUID = UUID()) {
        self.kind = kind
        self.organisationID = organisationID
        self.id = id
        let bytes = SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }
        self.secret = bytes.base64URLEncoded
    }

    /// Parses a token a client presented; nil when it does not have the shape of `kind`.
    public init?(parsing text: String, kind: Kind) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[0] == kind.rawValue,
            let org = Validate.uuid(String(parts[1])), let id = Validate.uuid(String(parts[2])),
            !parts[3].isEmpty, parts[3].count <= 64
        else { return nil }
        self.kind = kind
        self.organisationID = org
        self.id = id
        self.secret = String(parts[3])
    }

    /// The whole token, as the client stores it.
    public var text: String { "\(kind.rawValue).\(organisationID.lowercased).\(id.lowercased).\(secret)" }

    /// What identifies the token to a person without revealing it.
    public var prefix: String { Self.prefix(kind: kind, organisationID: organisationID, id: id) }

    /// The prefix of the token with this id, for listings that never see the secret.
    public static func prefix(kind: Kind, organisationID: UUID, id: UUID) -> String {
        "\(kind.rawValue).\(organisationID.lowercased).\(id.lowercased.prefix(8))"
    }

    /// SHA-256 of the secret: what the database keeps.
    public var secretHash: Data { Data(SHA256.hash(data: Data(secret.utf8))) }
}
