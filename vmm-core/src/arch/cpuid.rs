//! Guest CPUID: what KVM supports, with per-vCPU topology filled in.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: HTT, "logical processor count field is valid".
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 5: VMX.
const ECX_VMX: u32 = 1 << 5;
/// CPUID.80000001h: extended features; ECX bit 2: SVM.
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const ECX_SVM: u32 = 1 << 2;

/// Adjusts a copy of KVM's supported CPUID for vCPU `index` of `count`:
/// the initial APIC ID (leaf 1 and the x2APIC topology leaves), the logical
/// processor count, and the hypervisor bit. VMX and SVM are hidden: a guest
/// running guests of its own would have nested state that lucos does not
/// carry through a live VMM upgrade (docs/upgrade.md).
pub fn set_vcpu_topology(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                entry.ecx &= !ECX_VMX;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = u32::from(index);
            }
            LEAF_EXT_FEATURES => {
                entry.ecx &= !ECX_SVM;
            }
            _ => {}
        }
    }
}
