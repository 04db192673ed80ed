import Foundation
import HeraldCore
import Testing

@Suite struct DestinationGuardTests {
    let strict = DestinationGuard()

    @Test(arguments: [
        ("http://169.254.169.254/latest/meta-data", BlockedAddressKind.metadata),
        ("http://10.0.0.5/", .private),
        ("http://172.16.3.4/", .private),
        ("http://192.168.1.1/", .private),
        ("http://[::1]/", .loopback),
        ("http://[fd00:ec2::254]/", .metadata),
        ("http://[fd12:3456::1]/", .uniqueLocal),
        ("http://[fe80::1]/", .linkLocal),
        ("http://[::ffff:127.0.0.1]/", .loopback),
        ("http://[::ffff:169.254.169.254]/", .metadata),
        ("http://[64:ff9b::a00:1]/", .private), // NAT64 of 10.0.0.1
        ("http://[2002:7f00:1::1]/", .loopback), // 6to4 of 127.0.0.1
        ("http://2130706433/", .loopback), // decimal 127.0.0.1
        ("http://0x7f000001/", .loopback),
        ("http://0177.0.0.1/", .loopback),
        ("http://0x7f.1/", .loopback),
        ("http://127.1/", .loopback),
        ("http://%31%32%37.0.0.1/", .loopback),
        ("http://localhost/", .loopback),
        ("http://LOCALHOST:8080/", .loopback),
        ("http://0.0.0.0/", .unspecified),
        ("http://[::]/", .unspecified),
        ("http://100.100.100.200/", .metadata),
        ("http://100.64.0.1/", .sharedAddressSpace),
        ("http://224.0.0.1/", .multicast),
        ("http://[ff02::1]/", .multicast),
        ("http://255.255.255.255/", .broadcast),
        ("http://240.0.0.1/", .reserved),
        ("http://192.0.2.1/", .documentation),
        ("http://[2001:db8::1]/", .documentation),
        ("http://198.18.0.1/", .benchmarking),
        ("http://[3fff::1]/", .documentation),
        // Every IPv6 form that embeds an IPv4 address is judged by that address (issue 8 item 8).
        ("http://[::ffff:0:169.254.169.254]/", .metadata), // IPv4-translated, RFC 2765
        ("http://[::ffff:0:a00:1]/", .private),
        ("http://[::a9fe:a9fe]/", .metadata), // IPv4-compatible (deprecated)
        ("http://[64:ff9b:1::a00:1]/", .private), // local-use NAT64, RFC 8215
        ("http://[64:ff9b:1:abcd::7f00:1]/", .loopback),
        ("http://[2002:a9fe:a9fe::1]/", .metadata), // 6to4
        ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", .private), // Teredo, client 10.0.0.1 inverted
        ("http://[2001:0:4136:e378:8000:63bf:a247:27dd]/", .tunnel), // Teredo, public client: still a tunnel
        ("http://[2606:4700:1::5efe:a00:1]/", .private), // ISATAP interface id
        ("http://[2606:4700:1::200:5efe:c0a8:101]/", .private),
    ])
    func refusesNonPublicAddresses(url: String, kind: BlockedAddressKind) {
        #expect {
            _ = try strict.vet(url: url)
        } throws: { error in
            guard let refusal = error as? DestinationRefusal, case .blockedAddress(_, let found) = refusal.reason else { return false }
            return found == kind && refusal.detail.contains(kind.phrase)
        }
    }

    @Test func refusalSentence() throws {
        let error = #expect(throws: DestinationRefusal.self) { try strict.vet(url: "http://127.0.0.1/") }
        #expect(
            error?.detail
                == "The URL's host is 127.0.0.1, a loopback address; Herald does not send to private, loopback, link-local or metadata addresses."
        )
        let named = #expect(throws: DestinationRefusal.self) { try strict.vet(url: "http://2130706433/") }
        #expect(named?.detail.hasPrefix("The URL's host resolves to 127.0.0.1, a loopback address;") == true)
        let mapped = #expect(throws: DestinationRefusal.self) { try strict.vet(url: "http://[::ffff:127.0.0.1]/") }
        #expect(mapped?.detail.hasPrefix("The URL's host is ::ffff:127.0.0.1 (embedding 127.0.0.1), a loopback address;") == true)
    }

    @Test func syntacticRefusals() {
        #expect(throws: DestinationRefusal(reason: .scheme("ftp"), detail: "The URL's scheme \"ftp\" is not allowed; use https or http.")) {
            try strict.vet(url: "ftp://example.com/")
        }
        for url in ["http://user:pw@example.com/", "http://user@example.com/", "http://@example.com/"] {
            let error = #expect(throws: DestinationRefusal.self) { try strict.check(url: url) }
            #expect(error?.reason == .credentialsInURL, "\(url)")
        }
        for url in [
            "not a url", "/relative/path", "http:///path", "http://example.com:0/", "http://example.com:70000/",
            "http://ex%00ample.com/", "http://ex%2Fample.com/", "mailto:someone@example.com",
        ] {
            let error = #expect(throws: DestinationRefusal.self) { try strict.check(url: url) }
            #expect(error?.reason == .invalidURL || error?.reason == .scheme("mailto"), "\(url)")
        }
    }

    @Test func checkParsesParts() throws {
        let parsed = try strict.check(url: "HTTPS://Example.com/hook?x=1")
        #expect(parsed.scheme == "https" && parsed.host == "Example.com" && parsed.port == 443)
        let v6 = try strict.check(url: "http://[2606:4700::1111]:8443/")
        #expect(v6.host == "2606:4700::1111" && v6.port == 8443)
    }

    @Test func allowsPublicLiterals() throws {
        let vetted = try strict.vet(url: "http://93.184.216.34/")
        #expect(vetted.addresses == [IPAddress("93.184.216.34")!])
        #expect(try strict.vet(url: "https://[2606:4700:4700::1111]/").addresses == [IPAddress("2606:4700:4700::1111")!])
        #expect(try strict.vet(url: "http://[::ffff:93.184.216.34]/").addresses.count == 1)
        // Translation forms of a public IPv4 address stay usable.
        for url in [
            "http://[::ffff:0:5db8:d822]/", "http://[64:ff9b::5db8:d822]/", "http://[64:ff9b:1::5db8:d822]/",
            "http://[2002:5db8:d822::1]/", "http://[2606:4700:1::200:5efe:5db8:d822]/",
        ] {
            #expect(throws: Never.self, "\(url)") { try strict.vet(url: url) }
        }
    }

    @Test func embeddedIPv4Forms() {
        let forms: [(String, String?)] = [
            ("::ffff:10.0.0.1", "10.0.0.1"), ("::10.0.0.1", "10.0.0.1"), ("::ffff:0:10.0.0.1", "10.0.0.1"),
            ("64:ff9b::10.0.0.1", "10.0.0.1"), ("64:ff9b:1:2:3:4:a00:1", "10.0.0.1"), ("2002:a00:1::", "10.0.0.1"),
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1"), ("fe80::5efe:a00:1", "10.0.0.1"),
            ("::", nil), ("::1", nil), ("2606:4700::1111", nil), ("64:ff9b:2::a00:1", nil),
        ]
        for (text, embedded) in forms {
            #expect(IPAddress(text)?.embeddedIPv4 == embedded.flatMap { IPAddress($0) }, "\(text)")
        }
    }

    @Test func explicitAllowance() throws {
        let permissive = DestinationGuard(allowed: [IPNetwork("127.0.0.1/32")!])
        let vetted = try permissive.vet(url: "http://127.0.0.1:8080/")
        #expect(vetted.addresses == [.v4([127, 0, 0, 1])] && vetted.destination.port == 8080)
        #expect(throws: DestinationRefusal.self) { try permissive.vet(url: "http://127.0.0.2/") }
        #expect(throws: DestinationRefusal.self) { try permissive.vet(url: "http://[::1]/") }
        #expect(throws: DestinationRefusal.self) { try permissive.vet(url: "http://10.0.0.1/") }
        // The allowance reaches through translation forms, but not through a tunnel refused in its own right.
        #expect(throws: Never.self) { try permissive.vet(url: "http://[::ffff:0:127.0.0.1]/") }
        #expect(throws: DestinationRefusal.self) { try permissive.vet(url: "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/") }
    }

    @Test func anyBlockedAddressRefusesTheName() throws {
        // A name resolving to both a public and a loopback address is refused (judged without DNS).
        let destination = try strict.check(url: "https://rebind.example/")
        let error = #expect(throws: DestinationRefusal.self) {
            try strict.vet(destination, addresses: [IPAddress("93.184.216.34")!, IPAddress("::1")!])
        }
        #expect(error?.reason == .blockedAddress(.v6(Array(repeating: 0, count: 15) + [1]), .loopback))
        #expect(error?.detail.hasPrefix("The URL's host resolves to ::1, a loopback address;") == true)
        #expect(try strict.vet(destination, addresses: [IPAddress("93.184.216.34")!]).addresses.count == 1)
        #expect(strict.refusal(for: IPAddress("93.184.216.34")!) == nil)
        #expect(strict.refusal(for: IPAddress("127.0.0.1")!) == .loopback)
    }

    @Test func resolveWithoutNetwork() throws {
        // No external DNS in tests: only refusals decided before the resolver asks the network.
        let error = #expect(throws: DestinationRefusal.self) { try strict.resolve(host: "", port: 80) }
        #expect(error?.reason == .unresolvable(""))
        #expect(try strict.resolve(host: "localhost", port: 80).contains(.v4([127, 0, 0, 1])))
        #expect(try strict.resolve(host: "[::1]", port: 80) == [IPAddress("::1")!])
    }

    @Test func networks() {
        let ten = IPNetwork("10.1.2.3/8")!
        #expect(ten.description == "10.0.0.0/8" && ten == IPNetwork("10.0.0.0/8"))
        #expect(ten.contains(IPAddress("10.255.0.1")!) && !ten.contains(IPAddress("11.0.0.1")!))
        #expect(!ten.contains(IPAddress("::ffff:10.0.0.1")!)) // family-strict; the guard handles embedding
        #expect(IPNetwork("127.0.0.1")?.prefixLength == 32 && IPNetwork("::1")?.prefixLength == 128)
        #expect(IPNetwork("fc00::/7")!.contains(IPAddress("fd00:ec2::254")!))
        #expect(IPNetwork("0.0.0.0/0")!.contains(IPAddress("8.8.8.8")!))
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0.0/+8", "127.1", "0x7f.0.0.1", "[::1]", "nope", ""] {
            #expect(IPNetwork(bad) == nil, "\(bad)")
        }
        #expect(IPAddress("0177.0.0.1") == nil) // inet_pton rejects octal-looking forms
        #expect(IPAddress("::FFFF:7F00:1")?.description == "::ffff:127.0.0.1")
        #expect(IPAddress("2001:0db8:0:0:0:0:0:1")?.description == "2001:db8::1")
    }
}

@Suite("Trusted proxies")
struct TrustedProxiesTests {
    @Test("the client is the nearest hop that is not a trusted proxy, read only from a trusted proxy's connection")
    func client() throws {
        let proxies = try #require(TrustedProxies(setting: "10.0.0.0/8, 192.168.1.7, fd00::/8"))
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: ["203.0.113.5"]) == "203.0.113.5")
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: ["1.1.1.1, 203.0.113.5", "192.168.1.7"]) == "203.0.113.5")
        // Every hop trusted: the leftmost; a hop that is not an address: the hop after it.
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: ["10.2.2.2, 10.3.3.3"]) == "10.2.2.2")
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: ["203.0.113.5, unknown, 10.3.3.3"]) == "10.3.3.3")
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: []) == "10.1.1.1")
        #expect(proxies.client(peer: "fd00::1", forwardedFor: ["2001:db8::5"]) == "2001:db8::5")
        // Not from a trusted proxy: the header is the client's own words.
        #expect(proxies.client(peer: "203.0.113.9", forwardedFor: ["10.0.0.1"]) == "203.0.113.9")
        #expect(TrustedProxies([]).client(peer: "10.1.1.1", forwardedFor: ["203.0.113.5"]) == "10.1.1.1")
        // Ports, brackets, and an IPv4 peer seen through an IPv6 listener.
        #expect(proxies.client(peer: "::ffff:10.1.1.1", forwardedFor: ["203.0.113.5:4711"]) == "203.0.113.5")
        #expect(proxies.client(peer: "10.1.1.1", forwardedFor: ["[2001:db8::5]:443, 10.2.2.2:80"]) == "2001:db8::5")
        #expect(TrustedProxies(setting: "10.0.0.0/8, ten") == nil)
        #expect(TrustedProxies(setting: "10.0.0.0/33") == nil)
    }
}
