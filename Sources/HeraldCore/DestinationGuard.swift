import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// MARK: - IPAddress

/// An IPv4 or IPv6 address in network byte order (4 or 16 bytes).
public enum IPAddress: Sendable, Hashable, CustomStringConvertible {
    case v4([UInt8])
    case v6([UInt8])

    /// Parses the canonical textual forms accepted by `inet_pton`: dotted-quad IPv4 ("127.0.0.1",
    /// no octal/hex/short forms) or IPv6 ("::1", "::ffff:127.0.0.1"). Brackets and zone IDs are not accepted.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self = .v4(withUnsafeBytes(of: &v4) { Array($0) })
            return
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            self = .v6(withUnsafeBytes(of: &v6) { Array($0) })
            return
        }
        return nil
    }

    /// From raw network-order bytes: 4 bytes make an IPv4 address, 16 an IPv6 one.
    public init?(bytes: [UInt8]) {
        switch bytes.count {
        case 4: self = .v4(bytes)
        case 16: self = .v6(bytes)
        default: return nil
        }
    }

    public var bytes: [UInt8] {
        switch self {
        case .v4(let bytes), .v6(let bytes): bytes
        }
    }

    /// Canonical text: dotted quad, or RFC 5952 IPv6 via `inet_ntop` (e.g. "::ffff:127.0.0.1").
    public var description: String {
        switch self {
        case .v4(let bytes):
            return bytes.map(String.init).joined(separator: ".")
        case .v6(let bytes):
            guard bytes.count == 16 else { return "<invalid IPv6>" }
            var address = in6_addr()
            withUnsafeMutableBytes(of: &address) { $0.copyBytes(from: bytes) }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            guard inet_ntop(AF_INET6, &address, &buffer, socklen_t(buffer.count)) != nil else { return "<invalid IPv6>" }
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// The IPv4 address an IPv6 address stands for when connecting to it, in every form that embeds
    /// one (issue 8 item 8): IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96, deprecated; except ::
    /// and ::1), IPv4-translated (::ffff:0:0:0/96, RFC 2765), NAT64 well-known (64:ff9b::/96) and
    /// local-use (64:ff9b:1::/48, RFC 8215; read as a /96 translator, the IPv4 in the last 32 bits),
    /// 6to4 (2002::/16), Teredo (2001::/32, the client address stored inverted, RFC 4380) and ISATAP
    /// interface ids (…:0:5efe:a.b.c.d or …:200:5efe:a.b.c.d under any prefix, RFC 5214).
    public var embeddedIPv4: IPAddress? {
        guard case .v6(let b) = self, b.count == 16 else { return nil }
        let low = Array(b[12..<16])
        func zero(_ range: Range<Int>) -> Bool { b[range].allSatisfy { $0 == 0 } }
        if zero(0..<10) && b[10] == 0xFF && b[11] == 0xFF { return .v4(low) } // ::ffff:a.b.c.d
        if zero(0..<12) { // ::a.b.c.d (deprecated); :: and ::1 are themselves
            return low[0..<3].allSatisfy({ $0 == 0 }) && low[3] <= 1 ? nil : .v4(low)
        }
        if zero(0..<8) && b[8] == 0xFF && b[9] == 0xFF && zero(10..<12) { return .v4(low) } // ::ffff:0:a.b.c.d
        if b[0..<12] == [0x00, 0x64, 0xFF, 0x9B, 0, 0, 0, 0, 0, 0, 0, 0] { return .v4(low) } // 64:ff9b::a.b.c.d
        if b[0..<6] == [0x00, 0x64, 0xFF, 0x9B, 0x00, 0x01] { return .v4(low) } // 64:ff9b:1:…:a.b.c.d
        if b[0] == 0x20 && b[1] == 0x02 { return .v4(Array(b[2..<6])) } // 2002:aabb:ccdd::/48
        if b[0..<4] == [0x20, 0x01, 0x00, 0x00] { return .v4(low.map { ~$0 }) } // Teredo client, obfuscated
        if (b[8] == 0x00 || b[8] == 0x02) && b[9] == 0x00 && b[10] == 0x5E && b[11] == 0xFE { return .v4(low) } // ISATAP
        return nil
    }
}

// MARK: - IPNetwork

/// A CIDR block such as "10.0.0.0/8" or "::1/128"; a bare address means a single host (/32 or /128).
/// Host bits are cleared, so "10.1.2.3/8" is the same network as "10.0.0.0/8".
public struct IPNetwork: Sendable, Hashable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    public init?(_ text: String) {
        let parts = text.trimmingCharacters(in: .whitespaces).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 1 || parts.count == 2, let address = IPAddress(String(parts[0])) else { return nil }
        let maximum = address.bytes.count * 8
        var length = maximum
        if parts.count == 2 {
            // Digits only: Int("+8") would otherwise be accepted.
            guard !parts[1].isEmpty, parts[1].count <= 3, parts[1].allSatisfy(\.isASCII), parts[1].allSatisfy(\.isNumber),
                let parsed = Int(parts[1]), parsed <= maximum
            else { return nil }
            length = parsed
        }
        self.init(address: address, prefixLength: length)
    }

    public init?(address: IPAddress, prefixLength: Int) {
        guard (0...address.bytes.count * 8).contains(prefixLength) else { return nil }
        self.prefixLength = prefixLength
        let masked = Self.mask(address.bytes, prefixLength)
        self.address = address.isV4 ? .v4(masked) : .v6(masked)
    }

    /// True if `address` is of the same family and its first `prefixLength` bits match.
    public func contains(_ address: IPAddress) -> Bool {
        guard address.isV4 == self.address.isV4, address.bytes.count == self.address.bytes.count else { return false }
        return Self.mask(address.bytes, prefixLength) == self.address.bytes
    }

    public var description: String { "\(address)/\(prefixLength)" }

    private static func mask(_ bytes: [UInt8], _ length: Int) -> [UInt8] {
        bytes.enumerated().map { index, byte in
            let bits = min(max(length - index * 8, 0), 8)
            return bits == 0 ? 0 : byte & ~UInt8(truncatingIfNeeded: 0xFF >> bits)
        }
    }
}

extension IPAddress {
    fileprivate var isV4: Bool {
        if case .v4 = self { return true }
        return false
    }
}

// MARK: - Refusals

/// Why an address is not a legitimate webhook destination.
public enum BlockedAddressKind: String, Sendable, Hashable, CaseIterable {
    case unspecified, loopback, `private`, sharedAddressSpace, linkLocal, metadata, uniqueLocal, siteLocal
    case multicast, broadcast, documentation, benchmarking, discard, tunnel, reserved

    /// Noun phrase for `DestinationRefusal.detail`: "a loopback address".
    public var phrase: String {
        switch self {
        case .unspecified: "an unspecified (this-host) address"
        case .loopback: "a loopback address"
        case .private: "a private address"
        case .sharedAddressSpace: "a carrier-grade NAT (shared) address"
        case .linkLocal: "a link-local address"
        case .metadata: "a cloud metadata address"
        case .uniqueLocal: "a unique-local address"
        case .siteLocal: "a site-local address"
        case .multicast: "a multicast address"
        case .broadcast: "the broadcast address"
        case .documentation: "a documentation address"
        case .benchmarking: "a benchmarking address"
        case .discard: "a discard-only address"
        case .tunnel: "a Teredo tunnel address"
        case .reserved: "a reserved address"
        }
    }
}

/// A refused destination. `detail` is a sentence safe to return in an API error.
public struct DestinationRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: Sendable, Equatable {
        case invalidURL
        case scheme(String)
        case credentialsInURL
        case unresolvable(String)
        case blockedAddress(IPAddress, BlockedAddressKind)
    }

    public let reason: Reason
    public let detail: String

    public init(reason: Reason, detail: String) {
        self.reason = reason
        self.detail = detail
    }

    public var description: String { detail }
}

// MARK: - Guard

/// The parts of a syntactically acceptable destination URL.
public struct DestinationURL: Sendable, Equatable {
    public let url: URL
    /// Lowercased.
    public let scheme: String
    /// Without IPv6 brackets, percent-decoded, IDNA (punycode) for international names, as `URL.host` gives it.
    public let host: String
    /// Explicit port, or 443 / 80 for https / http.
    public let port: Int
}

/// A destination whose every resolved address passed the guard. Connect only to `addresses`
/// (pinning) so a second DNS lookup cannot swap in a private address (DNS rebinding).
public struct VettedDestination: Sendable, Equatable {
    public let destination: DestinationURL
    public let addresses: [IPAddress]
}

/// SSRF guard for outbound webhook and chat URLs: refuses loopback, private, link-local, metadata and
/// other non-public destinations unless an address falls inside one of the explicit `allowed` networks.
public struct DestinationGuard: Sendable {
    /// Explicit allowances that override the blocked ranges (e.g. 127.0.0.1/32 in test suites).
    public var allowed: [IPNetwork]
    /// Lowercase schemes accepted.
    public var allowedSchemes: Set<String>

    public init(allowed: [IPNetwork] = [], allowedSchemes: Set<String> = ["https", "http"]) {
        self.allowed = allowed
        self.allowedSchemes = Set(allowedSchemes.map { $0.lowercased() })
    }

    /// Blocked ranges, most specific first so the sentence names e.g. "metadata" rather than "link-local".
    static let blockedRanges: [(IPNetwork, BlockedAddressKind)] = [
        // Well-known instance metadata endpoints (all inside ranges below; listed for the wording).
        ("169.254.169.254/32", .metadata), // AWS, GCP, Azure, OCI, DigitalOcean…
        ("169.254.170.2/32", .metadata), // AWS ECS task metadata
        ("100.100.100.200/32", .metadata), // Alibaba Cloud
        ("192.0.0.192/32", .metadata), // Oracle Cloud (legacy)
        ("fd00:ec2::254/128", .metadata), // AWS IMDS over IPv6
        ("255.255.255.255/32", .broadcast),
        // IPv4
        ("0.0.0.0/8", .unspecified),
        ("10.0.0.0/8", .private),
        ("100.64.0.0/10", .sharedAddressSpace),
        ("127.0.0.0/8", .loopback),
        ("169.254.0.0/16", .linkLocal),
        ("172.16.0.0/12", .private),
        ("192.0.0.0/24", .reserved), // IETF protocol assignments
        ("192.0.2.0/24", .documentation),
        ("192.168.0.0/16", .private),
        ("198.18.0.0/15", .benchmarking),
        ("198.51.100.0/24", .documentation),
        ("203.0.113.0/24", .documentation),
        ("224.0.0.0/4", .multicast),
        ("240.0.0.0/4", .reserved),
        // IPv6
        ("::/128", .unspecified),
        ("::1/128", .loopback),
        ("fc00::/7", .uniqueLocal),
        ("fe80::/10", .linkLocal),
        ("fec0::/10", .siteLocal), // deprecated, still routed internally by some networks
        ("ff00::/8", .multicast),
        ("2001:db8::/32", .documentation),
        ("3fff::/20", .documentation), // RFC 9637
        ("2001::/32", .tunnel), // Teredo: the real IPv4 endpoint is obfuscated inside
        ("100::/64", .discard),
    ].map { text, kind in
        guard let network = IPNetwork(text) else { preconditionFailure("bad built-in network \(text)") }
        return (network, kind)
    }

    /// Why `address` is blocked, ignoring `allowed`; nil for a public address. IPv6 forms that embed an
    /// IPv4 address (see `IPAddress.embeddedIPv4`) are judged by that IPv4 address first, then by their
    /// own range (so Teredo stays refused even when its client address is public).
    public static func blockedKind(of address: IPAddress) -> BlockedAddressKind? {
        if let embedded = address.embeddedIPv4, let kind = blockedKind(of: embedded) { return kind }
        return blockedRanges.first { $0.0.contains(address) }?.1
    }

    /// Why `address` is refused under this guard, or nil if it may be used. An allowance matches the address
    /// itself or the IPv4 address it embeds (so 127.0.0.1/32 also admits ::ffff:127.0.0.1), but never through
    /// a tunnel form that is refused in its own right (Teredo).
    public func refusal(for address: IPAddress) -> BlockedAddressKind? {
        guard let kind = Self.blockedKind(of: address) else { return nil }
        let ownRangeBlocked = Self.blockedRanges.contains { $0.0.contains(address) }
        let isAllowed = allowed.contains { network in
            network.contains(address) || (!ownRangeBlocked && address.embeddedIPv4.map(network.contains) == true)
        }
        return isAllowed ? nil : kind
    }

    /// Syntactic checks only (no DNS): absolute URL with an allowed scheme, a host, no userinfo, port 1–65535.
    public func check(url text: String) throws(DestinationRefusal) -> DestinationURL {
        guard let url = URL(string: text), let rawScheme = url.scheme,
            let components = URLComponents(url: url, resolvingAgainstBaseURL: false)
        else { throw Self.invalidURL("The URL is not a valid absolute URL.") }
        let scheme = rawScheme.lowercased()
        guard allowedSchemes.contains(scheme) else {
            throw DestinationRefusal(
                reason: .scheme(scheme),
                detail: "The URL's scheme \"\(scheme)\" is not allowed; use \(allowedSchemes.sorted(by: >).joined(separator: " or "))."
            )
        }
        // Even an empty "@" is refused: userinfo is a classic parser-confusion vector.
        guard components.percentEncodedUser == nil, components.percentEncodedPassword == nil else {
            throw DestinationRefusal(
                reason: .credentialsInURL,
                detail: "The URL must not contain a user name or password; authenticate with the signing secret or headers instead."
            )
        }
        guard let host = url.host, !host.isEmpty else { throw Self.invalidURL("The URL has no host.") }
        // `host` is percent-decoded, so "%00" or "%2F" could smuggle characters that C resolvers or HTTP clients
        // read differently. Allow DNS-name characters, plus ':' and a zone ('%') for IPv6 literals.
        let isIPv6 = host.contains(":")
        let permitted = host.unicodeScalars.allSatisfy { scalar in
            switch scalar {
            case "a"..."z", "A"..."Z", "0"..."9", ".", "-", "_": true
            case ":", "%": isIPv6
            default: false
            }
        }
        guard permitted else { throw Self.invalidURL("The URL's host contains characters that are not allowed.") }
        let port = url.port ?? (scheme == "https" ? 443 : 80)
        guard (1...65535).contains(port) else { throw Self.invalidURL("The URL's port must be between 1 and 65535.") }
        return DestinationURL(url: url, scheme: scheme, host: host, port: port)
    }

    /// Resolves `host` with the system resolver (getaddrinfo, AF_UNSPEC, SOCK_STREAM), returning every address
    /// in resolver order without duplicates. Numeric shorthands ("127.1", "0x7f000001", "2130706433") resolve
    /// exactly as a connecting client would see them. Blocking: call off the event loop.
    public func resolve(host: String, port: Int) throws(DestinationRefusal) -> [IPAddress] {
        var name = host
        if name.hasPrefix("["), name.hasSuffix("]") { name = String(name.dropFirst().dropLast()) }
        let unresolvable = DestinationRefusal(
            reason: .unresolvable(host), detail: "The URL's host \(host) could not be resolved."
        )
        guard !name.isEmpty, !name.utf8.contains(0) else { throw unresolvable }

        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Glibc)
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
            hints.ai_socktype = SOCK_STREAM
        #endif
        hints.ai_flags = AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(name, String(port), &hints, &list) == 0, let first = list else { throw unresolvable }
        defer { freeaddrinfo(first) }

        var addresses: [IPAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor?.pointee {
            cursor = info.ai_next
            guard let sockaddrPointer = info.ai_addr else { continue }
            let address: IPAddress
            switch info.ai_family {
            case AF_INET:
                var ip = sockaddrPointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
                address = .v4(withUnsafeBytes(of: &ip) { Array($0) })
            case AF_INET6:
                var ip = sockaddrPointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                address = .v6(withUnsafeBytes(of: &ip) { Array($0) })
            default:
                continue
            }
            if !addresses.contains(address) { addresses.append(address) }
        }
        guard !addresses.isEmpty else { throw unresolvable }
        return addresses
    }

    /// `check`, then `resolve`, refusing if ANY resolved address is refused (a name resolving to both a public
    /// and a loopback address is refused). Returns the addresses to pin the connection to.
    public func vet(url text: String) throws(DestinationRefusal) -> VettedDestination {
        let destination = try check(url: text)
        return try vet(destination, addresses: try resolve(host: destination.host, port: destination.port))
    }

    /// The judging half of `vet(url:)`, for addresses obtained elsewhere (e.g. a custom resolver): refuses if
    /// any address is refused.
    public func vet(_ destination: DestinationURL, addresses: [IPAddress]) throws(DestinationRefusal) -> VettedDestination {
        guard !addresses.isEmpty else {
            throw DestinationRefusal(
                reason: .unresolvable(destination.host), detail: "The URL's host \(destination.host) could not be resolved."
            )
        }
        for address in addresses {
            guard let kind = refusal(for: address) else { continue }
            var what = "\(address), \(kind.phrase)"
            if case .v6 = address, let embedded = address.embeddedIPv4, Self.blockedKind(of: embedded) != nil {
                what = "\(address) (embedding \(embedded)), \(kind.phrase)"
            }
            let verb = IPAddress(destination.host) == address ? "is" : "resolves to"
            throw DestinationRefusal(
                reason: .blockedAddress(address, kind),
                detail: "The URL's host \(verb) \(what); Herald does not send to private, loopback, link-local or metadata addresses."
            )
        }
        return VettedDestination(destination: destination, addresses: addresses)
    }

    private static func invalidURL(_ detail: String) -> DestinationRefusal {
        DestinationRefusal(reason: .invalidURL, detail: detail)
    }
}

extension IPAddress {
    /// The address as a URL host: IPv6 in brackets.
    public var urlHost: String {
        if case .v6 = self { return "[\(description)]" }
        return description
    }
}

extension VettedDestination {
    public var scheme: String { destination.scheme }

    /// The `Host` header for the original name (with the port when it is not the scheme's default).
    public var hostHeader: String {
        let host = destination.host.contains(":") ? "[\(destination.host)]" : destination.host
        let defaultPort = destination.scheme == "https" ? 443 : 80
        return destination.port == defaultPort ? host : "\(host):\(destination.port)"
    }
}

extension DestinationGuard {
    /// `vet(url:)` on a Dispatch thread: name resolution blocks, and the cooperative pool must not.
    public func vetInBackground(url: String) async -> Result<VettedDestination, DestinationRefusal> {
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(returning: Result { () throws(DestinationRefusal) in try self.vet(url: url) })
            }
        }
    }
}
