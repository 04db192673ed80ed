import Foundation

/// The client's address behind the proxies an operator trusts (`HERALD_TRUSTED_PROXIES`): a load
/// balancer or ingress that appends the address it received a request from to `X-Forwarded-For`.
/// Without it, every request through a proxy comes from the proxy's address, so the per-address
/// login limits locked everyone out at once (20 failed logins through one ingress; a trial).
///
/// Only a request whose connection comes from a trusted proxy has its header read, from the
/// right: each hop a trusted proxy added is passed over, and the first address that is not a
/// trusted proxy is the client's. The entries to its left were written by the client and are
/// never believed. An entry that is not an address ends the walk at the hop before it.
public struct TrustedProxies: Sendable, Equatable {
    public let networks: [IPNetwork]

    public init(_ networks: [IPNetwork]) {
        self.networks = networks
    }

    /// From "10.0.0.0/8, 192.168.1.7" (addresses or CIDR blocks); nil when an item is neither.
    public init?(setting: String) {
        var networks: [IPNetwork] = []
        for item in setting.split(separator: ",") {
            guard let network = IPNetwork(String(item)) else { return nil }
            networks.append(network)
        }
        self.networks = networks
    }

    public func trusts(_ address: IPAddress) -> Bool {
        networks.contains { $0.contains(address) }
    }

    /// The client's address: `peer` (the connection's), or, when `peer` is a trusted proxy, the
    /// nearest address in `forwardedFor` (the `X-Forwarded-For` values in order) that is not.
    /// Entries may carry a port (`203.0.113.5:4711`, `[2001:db8::5]:443`); an IPv4 address seen
    /// as IPv6 (`::ffff:10.1.2.3`, a listener on `::`) is read as IPv4.
    public func client(peer: String?, forwardedFor: [String]) -> String? {
        guard !networks.isEmpty, let peer, let peerAddress = Self.address(peer), trusts(peerAddress) else { return peer }
        let hops = forwardedFor.flatMap { $0.split(separator: ",") }.map(String.init)
        var client = peerAddress
        for hop in hops.reversed() {
            guard let address = Self.address(hop) else { break }
            client = address
            if !trusts(address) { break }
        }
        return client.description
    }

    /// An address as a proxy or a socket writes it: with or without a port, IPv6 in brackets
    /// when it has one, an IPv4-mapped IPv6 address as its IPv4 one.
    static func address(_ text: String) -> IPAddress? {
        var host = Substring(text.trimmingCharacters(in: .whitespaces))
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            host = host[host.index(after: host.startIndex)..<close]
        } else if host.filter({ $0 == ":" }).count == 1, let colon = host.firstIndex(of: ":") {
            host = host[..<colon]
        }
        guard let address = IPAddress(String(host)) else { return nil }
        let bytes = address.bytes
        if bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            return .v4(Array(bytes[12..<16]))
        }
        return address
    }
}
