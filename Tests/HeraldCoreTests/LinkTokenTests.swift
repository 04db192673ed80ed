import Crypto
import Foundation
import Testing

@testable import HeraldCore

@Suite struct LinkTokenTests {
    static let secretA = Data(repeating: 0xA1, count: 32).base64EncodedString()
    static let secretB = Data((0..<48).map { UInt8($0) }).base64EncodedString()
    let ring = try! LinkKeyRing(configuration: "k2:\(secretA), k1:\(secretB)")
    let now = Date(timeIntervalSince1970: 1_750_000_000)

    var claims: LinkClaims {
        LinkClaims(
            scope: .unsubscribe, organisationID: UUID(), userID: UUID(), deliveryID: UUID(), notificationID: UUID(),
            categoryID: UUID(), channel: "email", expiresAt: now.addingTimeInterval(86_400.75))
    }

    @Test("the claims' JSON is the bytes JSONEncoder writes with sorted keys, for every combination of optional claims")
    func claimsJSON() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        for mask in 0..<64 {
            func some(_ bit: Int) -> UUID? { mask & (1 << bit) != 0 ? UUID() : nil }
            let claims = LinkClaims(
                scope: mask % 3 == 0 ? .click : .unsubscribe, organisationID: UUID(), userID: UUID(), deliveryID: some(0),
                digestItemID: some(1), digestRunID: some(2), notificationID: some(3), categoryID: some(4),
                channel: mask & 32 != 0 ? "e\"m/a\\il\n" : nil, expiresAt: now.addingTimeInterval(Double(mask) * 1000.5))
            #expect(claims.json == String(decoding: try encoder.encode(claims), as: UTF8.self))
        }
    }

    @Test func roundTrip() throws {
        let claims = self.claims
        let token = ring.sign(claims)
        #expect(token.split(separator: ".").count == 3 && token.split(separator: ".")[1] == "k2")
        #expect(token.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) })
        #expect(ring.verify(token, scope: .unsubscribe, now: now) == claims)
        #expect(claims.expiresAt.timeIntervalSince1970 == 1_750_086_400)
        let minimal = LinkClaims(scope: .click, organisationID: UUID(), userID: UUID(), expiresAt: now.addingTimeInterval(60))
        #expect(ring.verify(ring.sign(minimal), scope: .click, now: now) == minimal)
        #expect(token.count < 300, "token is \(token.count) characters")
    }

    @Test func tamperingAndMisuse() throws {
        let token = ring.sign(claims)
        let parts = token.split(separator: ".").map(String.init)
        func flipLast(_ s: String) -> String { String(s.dropLast()) + (s.last == "A" ? "B" : "A") }
        func flipFirst(_ s: String) -> String { (s.first == "A" ? "B" : "A") + String(s.dropFirst()) }
        let other = try LinkKeyRing(configuration: "k2:\(Data(repeating: 7, count: 32).base64EncodedString())")
        let bad = [
            [flipFirst(parts[0]), parts[1], parts[2]].joined(separator: "."), // tampered payload
            [parts[0], parts[1], flipFirst(parts[2])].joined(separator: "."), // tampered MAC
            [parts[0], parts[1], flipLast(parts[2])].joined(separator: "."), // tampered MAC (trailing bits)
            [parts[0], "k1", parts[2]].joined(separator: "."), // flipped kid
            [parts[0], "k9", parts[2]].joined(separator: "."), // unknown kid
            [parts[0], parts[1], parts[2] + "A"].joined(separator: "."),
            [parts[0], parts[1]].joined(separator: "."),
            token + ".", "", "...", "a.b.c",
        ]
        for candidate in bad { #expect(ring.verify(candidate, scope: .unsubscribe, now: now) == nil, "\(candidate)") }
        #expect(other.verify(token, scope: .unsubscribe, now: now) == nil) // same kid, different secret
        #expect(ring.verify(token, scope: .click, now: now) == nil) // wrong scope
        #expect(ring.verify(token, scope: .unsubscribe, now: claims.expiresAt) == nil) // expired (boundary)
        #expect(ring.verify(token, scope: .unsubscribe, now: now.addingTimeInterval(86_400 * 2)) == nil)
    }

    @Test func rotation() throws {
        let old = try LinkKeyRing(configuration: "k1:\(Self.secretB)")
        let token = old.sign(claims)
        #expect(ring.verify(token, scope: .unsubscribe, now: now) != nil) // k1 still in the ring
        let retired = try LinkKeyRing(configuration: "k2:\(Self.secretA)")
        #expect(retired.verify(token, scope: .unsubscribe, now: now) == nil)
        #expect(ring.current.id == "k2" && Set(ring.all.keys) == ["k1", "k2"])
    }

    @Test func configuration() throws {
        let urlSafe = Data(repeating: 0xFB, count: 33).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
        #expect(try LinkKeyRing(configuration: "\n  a_b-1:\(urlSafe)\n").current.id == "a_b-1")
        let cases: [(String, LinkKeyRingError)] = [
            ("", .empty),
            ("   ", .empty),
            ("k1", .malformedEntry(position: 1)),
            ("k1:\(Self.secretA),", .malformedEntry(position: 2)),
            ("k1:", .malformedEntry(position: 1)),
            (":\(Self.secretA)", .malformedEntry(position: 1)),
            ("bad kid:\(Self.secretA)", .invalidKeyID("bad kid")),
            ("seventeen-chars-x:\(Self.secretA)", .invalidKeyID("seventeen-chars-x")),
            ("k1:not*base64", .invalidSecret(keyID: "k1")),
            ("k1:\(Data(repeating: 1, count: 31).base64EncodedString())", .secretTooShort(keyID: "k1", bytes: 31)),
            ("k1:\(Self.secretA),k1:\(Self.secretB)", .duplicateKeyID("k1")),
        ]
        for (text, expected) in cases {
            #expect(throws: expected, "\(text)") { try LinkKeyRing(configuration: text) }
        }
        #expect(!LinkKeyRingError.invalidSecret(keyID: "k1").description.contains(Self.secretA))
    }
}
