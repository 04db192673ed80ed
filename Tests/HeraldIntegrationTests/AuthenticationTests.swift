import Crypto
import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import JWTKit
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// RFC 8725 in practice: each way a forged or stale token can arrive is refused with 401.
@Suite("Access tokens")
struct AccessTokenTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    func base64url(_ data: Data) -> String {
        data.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    func json(_ object: [String: Any]) -> Data { try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) }

    func claims(_ org: TestOrganisation, _ change: (inout [String: Any]) -> Void = { _ in }) -> [String: Any] {
        let now = Int(Date().timeIntervalSince1970)
        var claims: [String: Any] = [
            "iss": "herald", "aud": ["herald-api"], "sub": org.ownerID.uuidString.lowercased(), "org": org.id.uuidString.lowercased(),
            "exp": now + 600, "nbf": now - 10, "iat": now - 10, "jti": UUID().uuidString,
        ]
        change(&claims)
        return claims
    }

    /// A token signed with the test key (ES256), with any header and claims.
    func signed(header: [String: Any] = ["alg": "ES256", "kid": "test-key", "typ": "JWT"], _ claims: [String: Any]) throws -> String {
        let input = base64url(json(header)) + "." + base64url(json(claims))
        let signature = try P256.Signing.PrivateKey(pemRepresentation: env.signingKey.pemRepresentation)
            .signature(for: Data(input.utf8)).rawRepresentation
        return input + "." + base64url(signature)
    }

    func status(of token: String) async throws -> TestResponse {
        let app = try env.application()
        return try await app.test(.router) { client in try await client.send(.get, "/v1/me", token: token) }
    }

    @Test("a well-formed token signed with the configured key is accepted")
    func accepted() async throws {
        let org = try await TestOrganisation.make()
        let handMade = try await status(of: signed(claims(org)))
        #expect(handMade.status == .ok, "\(handMade.text)")
        let issued = try await status(of: org.ownerToken)
        #expect(issued.status == .ok, "\(issued.text)")
    }

    @Test(
        "forged and stale tokens are refused with 401 problem+json",
        arguments: [
            "alg none", "HS256 signed with the public key", "unknown kid", "no kid", "expired", "nbf in the future",
            "wrong aud", "wrong iss", "tampered payload", "tampered signature", "not a JWT", "padded", "stray bits",
        ])
    func refused(case name: String) async throws {
        let org = try await TestOrganisation.make()
        let now = Int(Date().timeIntervalSince1970)
        let token: String
        switch name {
        case "alg none":
            token = base64url(json(["alg": "none", "kid": "test-key", "typ": "JWT"])) + "." + base64url(json(claims(org))) + "."
        case "HS256 signed with the public key":
            let input = base64url(json(["alg": "HS256", "kid": "test-key", "typ": "JWT"])) + "." + base64url(json(claims(org)))
            let key = SymmetricKey(data: Data(env.signingKey.publicKey.pemRepresentation.utf8))
            token = input + "." + base64url(Data(HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: key)))
        case "unknown kid":
            token = try signed(header: ["alg": "ES256", "kid": "someone-else", "typ": "JWT"], claims(org))
        case "no kid":
            token = try signed(header: ["alg": "ES256", "typ": "JWT"], claims(org))
        case "expired":
            token = try signed(claims(org) { $0["exp"] = now - 120 })
        case "nbf in the future":
            token = try signed(claims(org) { $0["nbf"] = now + 120 })
        case "wrong aud":
            token = try signed(claims(org) { $0["aud"] = ["another-api"] })
        case "wrong iss":
            token = try signed(claims(org) { $0["iss"] = "someone-else" })
        case "tampered payload":
            let parts = try signed(claims(org)).split(separator: ".").map(String.init)
            let other = try await TestOrganisation.make()
            token = parts[0] + "." + base64url(json(claims(other))) + "." + parts[2]
        case "tampered signature":
            var parts = try signed(claims(org)).split(separator: ".").map(String.init)
            var signature = Data(
                base64Encoded: parts[2].replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/") + "==")!
            signature[5] ^= 0x01
            parts[2] = base64url(signature)
            token = parts.joined(separator: ".")
        case "padded":
            // A valid token, spelled with base64 padding (a trial: accepted).
            token = try signed(claims(org)) + "=="
        case "stray bits":
            // A valid token whose last character differs only in bits no byte uses (a trial: accepted).
            let valid = try signed(claims(org))
            let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
            let last = try #require(alphabet.firstIndex(of: valid.last!))
            token = String(valid.dropLast()) + String(alphabet[last ^ 1])
            #expect(try await status(of: valid).status == .ok, "the token itself is valid")
        default:
            token = "hello"
        }
        let response = try await status(of: token)
        #expect(response.isProblem(.unauthorized), "\(name): \(response.status) \(response.text)")
    }

    @Test("the leeway forgives a little clock skew and no more")
    func leeway() async throws {
        let org = try await TestOrganisation.make()
        let now = Int(Date().timeIntervalSince1970)
        #expect(try await status(of: signed(claims(org) { $0["exp"] = now - 10 })).status == .ok)
        #expect(try await status(of: signed(claims(org) { $0["nbf"] = now + 10 })).status == .ok)
        #expect(try await status(of: signed(claims(org) { $0["exp"] = now - 61 })).status == .unauthorized)
    }

    @Test("a token of a deactivated user stops working at once")
    func deactivatedUser() async throws {
        let org = try await TestOrganisation.make()
        _ = try await org.store { tx in try await tx.setUserActive(org.memberID, false) }
        #expect(try await status(of: org.memberToken).isProblem(.unauthorized))
    }

    @Test("the JWKS publishes every live key, and its coordinates verify the tokens independently")
    func jwks() async throws {
        try await withOrganisation { org, client in
            let response = try await client.send(.get, "/.well-known/jwks.json")
            #expect(response.status == .ok)
            let key = try #require((response.json["keys"] as? [[String: Any]])?.first)
            #expect(key["kid"] as? String == "test-key")
            #expect(key["alg"] as? String == "ES256")
            // Rebuild the public key from x and y alone (SEC 1 uncompressed point) and check the signature.
            func bytes(_ text: Any?) throws -> Data {
                var s = try #require(text as? String).replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
                while s.count % 4 != 0 { s += "=" }
                return try #require(Data(base64Encoded: s))
            }
            let publicKey = try P256.Signing.PublicKey(x963Representation: Data([0x04]) + bytes(key["x"]) + bytes(key["y"]))
            let parts = org.ownerToken.split(separator: ".").map(String.init)
            let signature = try P256.Signing.ECDSASignature(rawRepresentation: bytes(parts[2]))
            #expect(publicKey.isValidSignature(signature, for: Data((parts[0] + "." + parts[1]).utf8)))
            // jwt-kit, a second independent implementation, accepts the JWKS document too.
            let keys = try await JWTKeyCollection().add(jwksJSON: response.text)
            _ = try await keys.getKey(for: "test-key", alg: "ES256")
        }
    }

    @Test("a checked token is remembered, and still expires and is not valid early; a changed one is checked again")
    func rememberedTokens() async throws {
        let key = AccessTokenKey(id: "k", privateKey: ES256PrivateKey())
        let tokens = try await AccessTokens(keys: [key], activeKeyID: nil, issuer: "herald", audience: "herald-api", ttl: 900, leeway: 30)
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let user = UUID()
        let token = try await tokens.issueAccessToken(organisationID: UUID(), userID: user, now: now)
        #expect(try tokens.verify(token, now: now).userID == user)
        #expect(tokens.checkedTokens.lookup(token) != nil)
        #expect(try tokens.verify(token, now: now.addingTimeInterval(900)).userID == user)
        #expect(throws: AccessTokenRejection.expired) { try tokens.verify(token, now: now.addingTimeInterval(930)) }
        #expect(throws: AccessTokenRejection.notYetValid) { try tokens.verify(token, now: now.addingTimeInterval(-31)) }
        // The same header and claims with another signature: not the remembered text.
        let parts = token.split(separator: ".")
        var signature = Array(Data(base64URLEncoded: String(parts[2]))!)
        signature[5] ^= 1
        let forged = parts[0] + "." + parts[1] + "." + Data(signature).base64URLEncoded
        #expect(throws: AccessTokenRejection.badSignature) { try tokens.verify(String(forged), now: now) }
    }

    @Test("two keys live during a rotation: tokens of both verify, the new one signs")
    func rotation() async throws {
        let old = AccessTokenKey(id: "2026-10", privateKey: ES256PrivateKey())
        let new = AccessTokenKey(id: "2026-11", privateKey: ES256PrivateKey())
        let before = try await AccessTokens(keys: [old], activeKeyID: nil, issuer: "herald", audience: "herald-api", ttl: 900, leeway: 30)
        let during = try await AccessTokens(
            keys: [old, new], activeKeyID: "2026-11", issuer: "herald", audience: "herald-api", ttl: 900, leeway: 30)
        let org = UUID(), user = UUID()
        let oldToken = try await before.issueAccessToken(organisationID: org, userID: user, now: Date())
        let newToken = try await during.issueAccessToken(organisationID: org, userID: user, now: Date())
        #expect(try during.verify(oldToken, now: Date()).userID == user)
        #expect(try during.verify(newToken, now: Date()).userID == user)
        let header =
            try JSONSerialization.jsonObject(with: Data(base64URLEncoded: String(newToken.split(separator: ".")[0]))!) as? [String: Any]
        #expect(header?["kid"] as? String == "2026-11")
        #expect(throws: AccessTokenRejection.self) { try before.verify(newToken, now: Date()) }
        #expect(during.jwks.map(\.kid).sorted() == ["2026-10", "2026-11"])
    }
}

@Suite("Login, refresh and logout")
struct SessionTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    func login(
        _ client: some TestClientProtocol, _ org: TestOrganisation, password: String = TestOrganisation.password,
        email: String? = nil
    ) async throws -> TestResponse {
        try await client.send(
            .post, "/v1/auth/token",
            json: """
                {"organisation": "\(org.slug)", "email": "\(email ?? "owner@\(org.slug).example")", "password": "\(password)"}
                """)
    }

    func refresh(_ client: some TestClientProtocol, _ token: String) async throws -> TestResponse {
        try await client.send(.post, "/v1/auth/refresh", json: #"{"refresh_token": "\#(token)"}"#)
    }

    @Test("login returns a working access token and a refresh token")
    func loginWorks() async throws {
        try await withOrganisation { org, client in
            let response = try await login(client, org)
            #expect(response.status == .ok)
            let access = try #require(response.json["access_token"] as? String)
            #expect(response.json["expires_in"] as? Int == 900)
            #expect((response.json["refresh_token"] as? String)?.hasPrefix("hrt.") == true)
            #expect(try await client.send(.get, "/v1/me", token: access).status == .ok)
        }
    }

    @Test("a wrong password, an unknown email and an unknown organisation get the same 401")
    func loginRefusals() async throws {
        try await withOrganisation { org, client in
            let wrongPassword = try await login(client, org, password: "not the password at all")
            let unknownEmail = try await login(client, org, email: "nobody@\(org.slug).example")
            var other = org
            other.slug = "no-such-org-\(UUID().uuidString.prefix(6).lowercased())"
            let unknownOrg = try await login(client, other)
            #expect(wrongPassword.isProblem(.unauthorized))
            #expect(wrongPassword.text == unknownEmail.text)
            #expect(wrongPassword.text == unknownOrg.text)
        }
    }

    @Test("a deactivated user cannot log in")
    func deactivatedCannotLogIn() async throws {
        try await withOrganisation { org, client in
            _ = try await org.store { tx in try await tx.setUserActive(org.memberID, false) }
            let response = try await login(client, org, email: "member@\(org.slug).example")
            #expect(response.isProblem(.unauthorized))
        }
    }

    @Test("failed logins are limited per account: 429 with Retry-After, even with the right password")
    func rateLimitedPerAccount() async throws {
        try await withOrganisation(configure: { $0.loginAttemptsPerAccount = 3 }) { org, client in
            for _ in 0..<3 { #expect(try await login(client, org, password: "wrong password here").status == .unauthorized) }
            let limited = try await login(client, org)
            #expect(limited.isProblem(.tooManyRequests))
            #expect(Int(limited.headers[.retryAfter] ?? "") ?? 0 > 0)
            // Another account of the same organisation is not affected.
            let member = try await login(client, org, email: "member@\(org.slug).example")
            #expect(member.status == .ok)
        }
    }

    @Test("failed logins are limited per client address across accounts")
    func rateLimitedPerAddress() async throws {
        let org = try await TestOrganisation.make()
        let app = try env.application(configure: {
            $0.loginAttemptsPerAddress = 3
            $0.port = 0
        })
        try await app.test(.live) { client in
            for i in 0..<3 {
                let response = try await login(client, org, email: "nobody\(i)@\(org.slug).example")
                #expect(response.status == .unauthorized)
            }
            #expect(try await login(client, org).isProblem(.tooManyRequests))
        }
    }

    /// A login sent from the local address `from` (127.0.0.x) to `port`: the status code of the
    /// answer.
    func login(from: String, port: Int, _ org: TestOrganisation, password: String, forwardedFor: String? = nil) async throws -> Int {
        let body = #"{"organisation": "\#(org.slug)", "email": "owner@\#(org.slug).example", "password": "\#(password)"}"#
        let forwarded = forwardedFor.map { "X-Forwarded-For: \($0)\r\n" } ?? ""
        let request =
            "POST /v1/auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\(forwarded)Connection: close\r\n\r\n\(body)"
        // A password's hash waits its turn behind every other test's logins (argon2 takes a core):
        // under the whole suite on two cores that took longer than 15 s once.
        let reply = try await rawExchange(port: port, from: from, silence: 90, Array(request.utf8)).reply
        // "HTTP/1.1 200 OK"
        return Int(reply.dropFirst(9).prefix(3)) ?? -1
    }

    @Test(
        "an account locks for the address that failed, not for everyone (a trial locked out another tenant's user); from ten addresses it locks everywhere"
    )
    func accountLockedPerAddress() async throws {
        let org = try await TestOrganisation.make()
        let app = try env.application(configure: {
            $0.loginAttemptsPerAccount = 2
            $0.port = 0
        })
        try await app.test(.live) { client in
            let port = try #require(client.port)
            let wrong = "not the password at all"
            for _ in 0..<2 { #expect(try await login(from: "127.0.0.2", port: port, org, password: wrong) == 401) }
            #expect(try await login(from: "127.0.0.2", port: port, org, password: TestOrganisation.password) == 429)
            // The owner, elsewhere, signs in.
            #expect(try await login(from: "127.0.0.3", port: port, org, password: TestOrganisation.password) == 200)
            // Twenty failures (ten addresses' worth) lock the account for every address.
            for n in 10..<30 { #expect(try await login(from: "127.0.0.\(n)", port: port, org, password: wrong) == 401) }
            #expect(try await login(from: "127.0.0.3", port: port, org, password: TestOrganisation.password) == 429)
        }
    }

    @Test("behind a trusted proxy the login limits count the client X-Forwarded-For names; from anyone else the header is ignored")
    func trustedProxyNamesTheClient() async throws {
        let org = try await TestOrganisation.make()
        let app = try env.application(configure: {
            $0.loginAttemptsPerAccount = 2
            $0.trustedProxies = TrustedProxies(setting: "127.0.0.9, 10.0.0.0/8")!
            $0.port = 0
        })
        try await app.test(.live) { client in
            let port = try #require(client.port)
            let wrong = "not the password at all"
            // Through the proxy (127.0.0.9), one client fails twice and is locked out...
            for _ in 0..<2 {
                #expect(try await login(from: "127.0.0.9", port: port, org, password: wrong, forwardedFor: "203.0.113.5") == 401)
            }
            #expect(
                try await login(from: "127.0.0.9", port: port, org, password: TestOrganisation.password, forwardedFor: "203.0.113.5")
                    == 429)
            // ...while another client through the same proxy signs in (an inner proxy's hop is passed over,
            // and what the client wrote on the left is not believed).
            #expect(
                try await login(
                    from: "127.0.0.9", port: port, org, password: TestOrganisation.password,
                    forwardedFor: "203.0.113.5, 203.0.113.6, 10.1.2.3")
                    == 200)
            // A client that is not a trusted proxy cannot pick its address: its own header is ignored.
            for _ in 0..<2 {
                #expect(
                    try await login(
                        from: "127.0.0.4", port: port, org, password: wrong, forwardedFor: "198.51.100.\(Int.random(in: 1..<250))") == 401)
            }
            #expect(
                try await login(from: "127.0.0.4", port: port, org, password: TestOrganisation.password, forwardedFor: "198.51.100.7")
                    == 429)
        }
    }

    @Test("refresh rotates; reusing a spent refresh token revokes the whole family")
    func refreshRotationAndReuse() async throws {
        try await withOrganisation { org, client in
            let first = try #require(try await login(client, org).json["refresh_token"] as? String)
            let rotated = try await refresh(client, first)
            #expect(rotated.status == .ok)
            let second = try #require(rotated.json["refresh_token"] as? String)
            #expect(second != first)
            #expect(try await client.send(.get, "/v1/me", token: rotated.json["access_token"] as? String).status == .ok)

            // The spent token comes back (stolen?): refused, and the family is revoked.
            #expect(try await refresh(client, first).isProblem(.unauthorized))
            #expect(try await refresh(client, second).isProblem(.unauthorized))

            // Another session of the same user is a different family and still works.
            let other = try #require(try await login(client, org).json["refresh_token"] as? String)
            #expect(try await refresh(client, other).status == .ok)
        }
    }

    @Test("a tampered refresh token is refused")
    func tamperedRefresh() async throws {
        try await withOrganisation { org, client in
            let token = try #require(try await login(client, org).json["refresh_token"] as? String)
            #expect(try await refresh(client, token.dropLast(2) + "xx").isProblem(.unauthorized))
            #expect(try await refresh(client, "hrt.garbage").isProblem(.unauthorized))
            // The real one still works: a forgery does not burn it.
            #expect(try await refresh(client, token).status == .ok)
        }
    }

    @Test("logout ends the session's refresh tokens")
    func logout() async throws {
        try await withOrganisation { org, client in
            let token = try #require(try await login(client, org).json["refresh_token"] as? String)
            #expect(try await client.send(.post, "/v1/auth/logout", json: #"{"refresh_token": "\#(token)"}"#).status == .noContent)
            #expect(try await refresh(client, token).isProblem(.unauthorized))
        }
    }

    @Test(
        "a user changes their own password with the current one: this session goes on, the others end, the old password stops; wrong tries are limited"
    )
    func changeOwnPassword() async throws {
        try await withOrganisation(configure: { $0.loginAttemptsPerAccount = 3 }) { org, client in
            let member = "member@\(org.slug).example"
            let here = try await login(client, org, email: member)
            let access = try #require(here.json["access_token"] as? String)
            let elsewhere = try await login(client, org, email: member)
            let otherAccess = try #require(elsewhere.json["access_token"] as? String)
            let otherRefresh = try #require(elsewhere.json["refresh_token"] as? String)
            let newPassword = "a much longer passphrase"
            func change(_ current: String, _ new: String, token: String? = nil) async throws -> TestResponse {
                try await client.send(
                    .put, "/v1/me/password", token: token ?? access,
                    json: #"{"current_password": "\#(current)", "new_password": "\#(new)"}"#)
            }
            // Refusals change nothing: a short new password, an API key, a wrong current one.
            let short = try await change(TestOrganisation.password, "short")
            #expect(short.isProblem(.unprocessableContent) && short.text.contains("new_password"), "\(short.text)")
            let key = try await org.serviceKey()
            #expect(try await change(TestOrganisation.password, newPassword, token: key).isProblem(.badRequest))
            let wrong = try await change("not my password at all", newPassword)
            #expect(wrong.isProblem(.forbidden) && wrong.text.contains("current password"), "\(wrong.text)")
            #expect(try await login(client, org, email: member).status == .ok, "nothing changed")

            #expect(try await change(TestOrganisation.password, newPassword).status == .noContent)
            // This session goes on; the other one ends, its refresh token too.
            #expect(try await client.send(.get, "/v1/me", token: access).status == .ok)
            try await expectEnded(client, otherAccess, "after a change of password elsewhere")
            #expect(try await refresh(client, otherRefresh).isProblem(.unauthorized))
            #expect(try await refresh(client, try #require(here.json["refresh_token"] as? String)).status == .ok)
            // The old password stops; the new one works.
            #expect(try await login(client, org, email: member).isProblem(.unauthorized))
            #expect(try await login(client, org, password: newPassword, email: member).status == .ok)
            let entry = try #require(
                try await org.store { tx in try await tx.auditEntries(action: "user.password.change", targetID: nil, limit: 5, after: nil) }
                    .items.first)
            #expect(entry.actorID == org.memberID && entry.targetID == org.memberID.uuidString.lowercased())
            // The other session, and the one the check of "nothing changed" opened.
            #expect(entry.after == .object(["sessions_ended": .number(2)]))

            // Three wrong tries (the account limit here; the change above reset the count) lock
            // the change, even with the right one.
            for _ in 0..<3 { #expect(try await change("not my password at all", "another long passphrase").isProblem(.forbidden)) }
            let locked = try await change(newPassword, "another long passphrase")
            #expect(locked.isProblem(.tooManyRequests) && Int(locked.headers[.retryAfter] ?? "") ?? 0 > 0, "\(locked.text)")
            // A user created without a password has none to change.
            let noPassword = try await org.store { tx in try await tx.createUser(NewUser(email: "np@\(org.slug).example", displayName: "N"))
            }
            let token = try await env.tokens.issueAccessToken(organisationID: org.id, userID: noPassword.id, now: Date())
            #expect(try await change("whatever it was", newPassword, token: token).isProblem(.conflict))
        }
    }

    @Test(
        "a refresh or login holding the user makes a password reset wait, and the reset then revokes the token it issued (a review: it outlived the reset)"
    )
    func sessionStartedDuringResetIsRevoked() async throws {
        let org = try await TestOrganisation.make()
        let member = org.memberID
        let (held, holding) = AsyncStream.makeStream(of: Void.self)
        let (release, releasing) = AsyncStream.makeStream(of: Void.self)
        // A refresh's transaction: the user held, a new token written, not yet committed.
        let refresh = Task {
            try await org.store { tx in
                _ = try await tx.holdUserCredentials(member)
                try await tx.insertRefreshToken(
                    id: UUID(), familyID: UUID(), userID: member, secretHash: Data(repeating: 1, count: 32),
                    expiresAt: Date().addingTimeInterval(3600))
                holding.yield()
                for await _ in release { break }
            }
        }
        for await _ in held { break }
        // The reset: it waits for the refresh's commit, then revokes what it wrote.
        let reset = Task {
            try await org.store { tx in
                try await tx.setPasswordHash(member, "reset")
                return try await tx.revokeRefreshTokens(ofUser: member, keeping: nil, at: Date())
            }
        }
        try await Task.sleep(for: .milliseconds(300)) // the reset reaches the held row (if it did not, it sees the commit)
        releasing.yield()
        try await refresh.value
        #expect(try await reset.value.count == 1)
        let live = try await org.store { tx in
            try await tx.query("SELECT count(*)::int FROM refresh_tokens WHERE user_id = \(member) AND revoked_at IS NULL")[0].decode(
                Int.self)
        }
        #expect(live == 0, "the token written during the reset is revoked with the others")
    }

    @Test(
        "an administrator sets a user's password: every session of theirs ends, a login lock is lifted; not an owner's, not their own"
    )
    func administratorSetsPassword() async throws {
        try await withOrganisation(configure: { $0.loginAttemptsPerAccount = 2 }) { org, client in
            let member = "member@\(org.slug).example"
            let session = try await login(client, org, email: member)
            let access = try #require(session.json["access_token"] as? String)
            // The member forgot their password and locked their account trying.
            for _ in 0..<2 { #expect(try await login(client, org, password: "a wrong guess here", email: member).status == .unauthorized) }
            #expect(try await login(client, org, email: member).isProblem(.tooManyRequests))

            let reset = "a temporary passphrase"
            let set = try await client.send(
                .put, "/v1/users/\(org.memberID)/password", token: org.ownerToken, json: #"{"password": "\#(reset)"}"#)
            #expect(set.status == .noContent, "\(set.text)")
            try await expectEnded(client, access, "after an administrator set the password")
            #expect(try await refresh(client, try #require(session.json["refresh_token"] as? String)).isProblem(.unauthorized))
            #expect(try await login(client, org, email: member).isProblem(.unauthorized), "the old password")
            #expect(try await login(client, org, password: reset, email: member).status == .ok, "the lock was lifted")

            // An admin (everything but the organisation's settings) cannot take over the owner.
            let adminID = try await org.store { tx in
                let admin = try await tx.createUser(NewUser(email: "admin@\(org.slug).example", displayName: "A"))
                _ = try await tx.setUserRoles(admin.id, [try await tx.builtinRole(.admin).id])
                return admin.id
            }
            let admin = try await env.tokens.issueAccessToken(organisationID: org.id, userID: adminID, now: Date())
            let takeover = try await client.send(
                .put, "/v1/users/\(org.ownerID)/password", token: admin, json: #"{"password": "\#(reset)"}"#)
            #expect(takeover.isProblem(.forbidden) && takeover.text.contains("organisation.manage"), "\(takeover.text)")
            #expect(try await login(client, org).status == .ok, "the owner's password is unchanged")
            // Their own goes through PUT /v1/me/password; a short one is a 422; a member may not.
            #expect(
                try await client.send(.put, "/v1/users/\(adminID)/password", token: admin, json: #"{"password": "\#(reset)"}"#)
                    .isProblem(.conflict))
            #expect(
                try await client.send(.put, "/v1/users/\(org.memberID)/password", token: admin, json: #"{"password": "short"}"#)
                    .isProblem(.unprocessableContent))
            #expect(
                try await client.send(
                    .put, "/v1/users/\(org.ownerID)/password", token: org.memberToken, json: #"{"password": "\#(reset)"}"#
                )
                .isProblem(.forbidden))
            let entries = try await org.store { tx in
                try await tx.auditEntries(action: "user.password.set", targetID: nil, limit: 5, after: nil).items
            }
            #expect(entries.count == 1 && entries.first?.targetID == org.memberID.uuidString.lowercased())
            #expect(!String(describing: entries).contains("argon2"), "no hash in the audit log")
        }
    }

    /// A 401 saying the session ended, for `access` on a plain call and on the bell's read.
    func expectEnded(_ client: some TestClientProtocol, _ access: String, _ comment: Comment) async throws {
        for path in ["/v1/me", "/v1/me/notifications/unread-count"] {
            let response = try await client.send(.get, path, token: access)
            #expect(
                response.isProblem(.unauthorized) && response.text.contains("session"), "\(path), \(comment): \(response.text.prefix(200))")
        }
    }

    @Test(
        "an access token stops with its session: at logout, when its family is revoked for a reused refresh token, and at deactivation, for good"
    )
    func accessTokensEndWithTheSession() async throws {
        try await withOrganisation { org, client in
            let member = "member@\(org.slug).example"
            // Logout: the access token of the session stops at once (it lived on for 15 minutes).
            let first = try await login(client, org, email: member)
            let access = try #require(first.json["access_token"] as? String)
            #expect(try await client.send(.get, "/v1/me/notifications/unread-count", token: access).status == .ok)
            #expect(
                try await client.send(.post, "/v1/auth/logout", json: #"{"refresh_token": "\#(first.json["refresh_token"] as! String)"}"#)
                    .status
                    == .noContent)
            try await expectEnded(client, access, "after logout")
            // Another session of the same user is not touched.
            let second = try await login(client, org, email: member)
            let secondAccess = try #require(second.json["access_token"] as? String)
            #expect(try await client.send(.get, "/v1/me", token: secondAccess).status == .ok)
            // A spent refresh token used again revokes the family: the old and the new access token stop.
            let spent = try #require(second.json["refresh_token"] as? String)
            let rotated = try await refresh(client, spent)
            let newest = try #require(rotated.json["access_token"] as? String)
            #expect(try await client.send(.get, "/v1/me", token: newest).status == .ok)
            #expect(try await refresh(client, spent).isProblem(.unauthorized))
            try await expectEnded(client, secondAccess, "the family revoked")
            try await expectEnded(client, newest, "the family revoked")
            // Deactivation ends every session; a reactivation does not bring their tokens back.
            let third = try #require(try await login(client, org, email: member).json["access_token"] as? String)
            #expect(try await client.send(.get, "/v1/me", token: third).status == .ok)
            #expect(try await client.send(.post, "/v1/users/\(org.memberID)/deactivate", token: org.ownerToken).status == .ok)
            #expect(try await client.send(.post, "/v1/users/\(org.memberID)/reactivate", token: org.ownerToken).status == .ok)
            try await expectEnded(client, third, "deactivated, then reactivated")
            // A new login works.
            let fourth = try #require(try await login(client, org, email: member).json["access_token"] as? String)
            #expect(try await client.send(.get, "/v1/me", token: fourth).status == .ok)
        }
    }

    @Test(
        "an instance trusts a live session for HERALD_SESSION_CHECK_SECONDS, and an end it is told of (by itself or SessionWatch) at once")
    func sessionAnswersKept() async throws {
        let sessions = SessionLiveness(seconds: 30)
        let access = VerifiedAccess(organisationID: UUID(), userID: UUID(), sessionID: UUID())
        let start = Date()
        var asked = 0
        func live(at now: Date, database: Bool = true) async throws -> Bool {
            try await sessions.isLive(access, now: now) { _ in
                asked += 1
                return database
            }
        }
        #expect(try await live(at: start) && asked == 1)
        #expect(try await live(at: start.addingTimeInterval(29)) && asked == 1, "kept for 30 s")
        #expect(try await live(at: start.addingTimeInterval(31)) && asked == 2, "asked again after")
        // The bus says the session ended: refused without asking, for good.
        sessions.ended(session: access.sessionID!)
        #expect(try await live(at: start.addingTimeInterval(41)) == false && asked == 2)
        #expect(try await live(at: start.addingTimeInterval(500)) == false && asked == 2)
        // A user's deactivation: what was found live for them before is asked again (and the
        // database, which revoked their sessions, says no); a check that started before the end
        // is not kept.
        let fresh = VerifiedAccess(organisationID: UUID(), userID: UUID(), sessionID: UUID())
        #expect(try await sessions.isLive(fresh, now: start) { _ in true })
        sessions.ended(user: fresh.userID, now: start.addingTimeInterval(1))
        var askedAgain = false
        #expect(
            try await sessions.isLive(fresh, now: start.addingTimeInterval(2)) { _ in
                askedAgain = true
                return false
            } == false)
        #expect(askedAgain)
        let racing = VerifiedAccess(organisationID: UUID(), userID: UUID(), sessionID: UUID())
        #expect(
            try await sessions.isLive(racing, now: start) { _ in
                sessions.ended(user: racing.userID, now: start.addingTimeInterval(1))
                return true
            })
        var askedAfterRace = false
        _ = try await sessions.isLive(racing, now: start.addingTimeInterval(2)) { _ in
            askedAfterRace = true
            return false
        }
        #expect(askedAfterRace, "an answer from a check that raced a deactivation is not kept")
        // No session (a token from outside a login): nothing to ask.
        #expect(try await sessions.isLive(VerifiedAccess(organisationID: UUID(), userID: UUID()), now: start) { _ in false })
    }
}
