/* fp_checksum.h - the Internet checksum (RFC 1071, RFC 1624).
 *
 * Sums are accumulated in host order over native-width loads: the one's
 * complement sum is byte-order independent (RFC 1071 §2(B)), so the folded
 * result, stored with memcpy, is already in wire order. fp_sum16 values below
 * are therefore "wire-order" 16-bit quantities: memcpy them into a header, or
 * read them with memcpy out of one, never htons/ntohs them.
 */
#ifndef FASTPUNCH_FP_CHECKSUM_H
#define FASTPUNCH_FP_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

typedef uint16_t fp_sum16;

/* Add len bytes at buf to a running 64-bit sum. Only the last chunk of a
 * checksummed region may have an odd length. */
uint64_t fp_csum_add(uint64_t sum, const void *buf, size_t len);

/* Fold a running sum to 16 bits and complement it: the value to store. */
fp_sum16 fp_csum_fold(uint64_t sum);

/* Checksum of one contiguous region (fold of fp_csum_add). */
fp_sum16 fp_csum(const void *buf, size_t len);

/* Running sum of the IPv4 pseudo-header. Addresses in host order. */
uint64_t fp_csum_pseudo(uint32_t saddr, uint32_t daddr, uint8_t proto, uint16_t len);

/* Running sum of the IPv6 pseudo-header (RFC 8200 §8.1): addresses as on
 * the wire, the upper-layer length as a 32-bit field, the next header. */
uint64_t fp_csum_pseudo6(const uint8_t saddr[16], const uint8_t daddr[16], uint8_t proto,
                         uint32_t len);

/* RFC 1624 eqn. 3 incremental update: HC' = ~(~HC + ~m + m').
 * old/new are the replaced field's bytes as loaded with memcpy (wire order). */
fp_sum16 fp_csum_replace2(fp_sum16 check, uint16_t old_wire, uint16_t new_wire);
fp_sum16 fp_csum_replace4(fp_sum16 check, uint32_t old_wire, uint32_t new_wire);

/* Checksum count regions of len bytes spaced stride apart (validation of a
 * received batch, and the throughput benchmark). out[i] gets region i's value. */
void fp_csum_many(const uint8_t *base, size_t stride, size_t len, size_t count,
                  fp_sum16 *out);

#endif
