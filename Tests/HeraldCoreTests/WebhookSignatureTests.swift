import Foundation
import HeraldCore
import Testing

@Suite struct WebhookSignatureTests {
    // Published Standard Webhooks test vector.
    let secret = WebhookSecret(string: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")!
    let id = "msg_p5jXN8AQM9LWM0D4loKWxJek"
    let body = Array(#"{"test": 2432232314}"#.utf8)
    let timestamp = Date(timeIntervalSince1970: 1_614_265_330)

    @Test func specVector() {
        let headers = WebhookSigner.headers(id: id, timestamp: timestamp, body: body, secrets: [secret])
        #expect(headers.map(\.0) == ["webhook-id", "webhook-timestamp", "webhook-signature"])
        #expect(headers.map(\.1) == [id, "1614265330", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="])
        #expect(
            WebhookSigner.verify(
                id: id, timestamp: 1_614_265_330, body: body,
                signatureHeader: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", secret: secret))
        #expect(
            WebhookSigner.verify(
                id: id, timestamp: 1_614_265_330, body: Data(body),
                signatureHeader: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", secret: secret,
                now: timestamp.addingTimeInterval(299)))
    }

    @Test func rejections() {
        let header = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        #expect(!WebhookSigner.verify(id: id, timestamp: 1_614_265_331, body: body, signatureHeader: header, secret: secret))
        #expect(!WebhookSigner.verify(id: id, timestamp: 1_614_265_330, body: body + [32], signatureHeader: header, secret: secret))
        #expect(!WebhookSigner.verify(id: id, timestamp: 1_614_265_330, body: body, signatureHeader: header, secret: .generate()))
        #expect(
            !WebhookSigner.verify(
                id: id, timestamp: 1_614_265_330, body: body, signatureHeader: "v2," + header.dropFirst(3), secret: secret))
        #expect(
            !WebhookSigner.verify(
                id: id, timestamp: 1_614_265_330, body: body, signatureHeader: header, secret: secret,
                now: timestamp.addingTimeInterval(301)))
    }

    @Test func rotationSignsWithEverySecret() throws {
        let old = WebhookSecret.generate(), new = WebhookSecret.generate()
        let headers = WebhookSigner.headers(
            id: "msg_1", timestamp: Date(timeIntervalSince1970: 1_700_000_000.9), body: body, secrets: [new, old])
        let signature = try #require(headers.first { $0.0 == "webhook-signature" }?.1)
        #expect(signature.split(separator: " ").count == 2)
        #expect(headers[1].1 == "1700000000")
        for key in [old, new] {
            #expect(WebhookSigner.verify(id: "msg_1", timestamp: 1_700_000_000, body: body, signatureHeader: signature, secret: key))
        }
    }

    @Test func secrets() {
        let generated = WebhookSecret.generate()
        #expect(generated.keyBytes.count == 32 && generated != WebhookSecret.generate())
        #expect(WebhookSecret(string: generated.string) == generated)
        #expect(secret.string == "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" && secret.keyBytes.count == 24)
        #expect("\(generated)" == "whsec_<redacted>")
        for bad in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_!!!!", "whsec_AAAA", "whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            #expect(WebhookSecret(string: bad) == nil, "\(bad)")
        }
    }
}
