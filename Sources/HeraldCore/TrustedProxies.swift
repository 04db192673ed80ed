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
    public func client(peer: String?, forwardedFor: [String]) -> String? {
        guard !networks.isEmpty, let peer, let peerAddress = IPAddress(peer), trusts(peerAddress) else { return peer }
        let hops = forwardedFor.flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) }
        var client = peer
        for hop in hops.reversed() {
            guard let address = IPAddress(hop) else { break }
            client = hop
            if !trusts(address) { break }
        }
        return client
    }
}
